"""Known harmless library messages are dropped; every other message of the same loggers stays."""

import logging

from dermt2im.core.quiet import DropKnown, quiet_libraries


def test_known_messages_are_dropped_and_others_kept(caplog):
    quiet_libraries()
    quiet_libraries()  # idempotent: one filter per logger
    caplog.set_level(logging.WARNING)
    logging.getLogger("transformers.utils.import_utils").warning(
        "`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil`")
    logging.getLogger("diffusers.loaders.peft").warning(
        "No LoRA keys associated to CLIPTextModel found with the prefix='text_encoder'.")
    logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
        "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'.")
    logging.getLogger("transformers.utils.import_utils").warning("something else entirely")
    logging.getLogger("diffusers.loaders.peft").warning("No LoRA keys associated to UNet2DConditionModel found")
    assert [r.getMessage() for r in caplog.records] == [
        "something else entirely", "No LoRA keys associated to UNet2DConditionModel found"]
    # idempotent: one filter of ours per logger (diffusers adds a rank-zero filter of its own once imported)
    assert sum(isinstance(f, DropKnown) for f in logging.getLogger("diffusers.loaders.peft").filters) == 1
