"""Run a peer script where torchvision is not installed (PyPI's Linux wheels are CUDA builds that
do not load beside the CPU torch here), with ``torchvision_transforms`` standing in for
``torchvision.transforms``.

    python bench/peers/without_torchvision.py SCRIPT [ARGS...]

transformers, peft and diffusers are imported first, so that they settle that torchvision is absent
before the stand-in exists; the script then runs as ``__main__``, unchanged.
"""

import runpy
import sys
import types
from pathlib import Path

import diffusers  # noqa: F401
import peft  # noqa: F401
import transformers  # noqa: F401

sys.path.insert(0, str(Path(__file__).parent))
import torchvision_transforms  # noqa: E402

package = types.ModuleType("torchvision")
package.transforms = torchvision_transforms
sys.modules.update({"torchvision": package, "torchvision.transforms": torchvision_transforms})
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
