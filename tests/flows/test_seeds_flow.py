"""The seed stages as a Prefect flow: phantoms -> ingest -> preprocess, cached by content."""

import pytest

from dermt2im.core.views import seeds_view
from dermt2im.core.manifest import SEEDS, read_manifest
from dermt2im.flows.seeds import prepare_seeds
from tests.prefect_utils import task_states

pytestmark = pytest.mark.slow
SMALL = ["phantoms.n_seed=8", "phantoms.n_test=4", "phantoms.size=48", "preprocess.size=32"]


def test_flow_prepares_seeds_and_test_sets_then_serves_cache(prefect_harness, workdir):
    state = prepare_seeds(str(workdir.root), config="tiny", overrides=SMALL, return_state=True)
    out = state.result()
    seeds = seeds_view(out["seeds"])
    assert len(seeds) == 8 and seeds["processed_path"].notna().all()
    assert set(out["test_sets"]) == {"phantom-isic", "phantom-ham"}
    for manifest in out["test_sets"].values():
        t = seeds_view(manifest)
        assert len(t) == 4 and set(t["split"]) == {"test"}
        assert not set(t["lesion_id"]) & set(seeds["lesion_id"])  # unseen lesions
    first = task_states(state)
    assert "Cached" not in sum(first.values(), [])

    again = prepare_seeds(str(workdir.root), return_state=True)  # the workdir's saved config
    second = task_states(again)
    assert set(second["ingest"]) == {"Cached"} and set(second["preprocess"]) == {"Cached"}
    assert again.result()["seeds_digest"] == out["seeds_digest"]


def test_changed_preprocess_config_reruns_only_preprocess(prefect_harness, workdir):
    prepare_seeds(str(workdir.root), config="tiny", overrides=SMALL)
    state = prepare_seeds(str(workdir.root), config="tiny", overrides=SMALL[:-1] + ["preprocess.size=24"],
                          return_state=True)
    states = task_states(state)
    assert set(states["ingest"]) == {"Cached"}
    assert "Completed" in states["preprocess"]
    from PIL import Image

    seeds = seeds_view(state.result()["seeds"])
    assert Image.open(seeds["processed_path"].iloc[0]).size == (24, 24)
