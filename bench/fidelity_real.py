"""What the fidelity metrics see on real images: held-out real vs unseen real vs altered real vs noise.

    python bench/fidelity_real.py [--size 128] [--train 70]

100 of the 130 real ISIC images in ../shared/data/real-dermoscopy (a seeded draw) are the seeds,
``--train`` of them the training split the seed embedding is fitted on and the rest held out (the
floor); the other 30 are judged as they are, blurred, colour-cast, both with grain, and the
random-weight tiny model's noise is the ceiling. Printed per set: KID and FID in the learned seed
embedding, FRD (unfiltered radiomics of L*, a*, b* at 64 px), and PRDC. The README's table comes from
one run of this script.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-dermoscopy"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--train", type=int, default=70)
    args = ap.parse_args()
    if not (ROOT / "labels.csv").is_file():
        sys.exit(f"the real images are not at {ROOT}")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from dermt2im.fidelity import distances as D
    from dermt2im.fidelity import radiomics as RA
    from dermt2im.fidelity.collect import noise_images
    from dermt2im.fidelity.embeddings import seed_embedding
    from dermt2im.core.workdir import Workdir
    from tests.real_images import real_images

    labels, images = real_images(ROOT, 256)
    images = [cv2.resize(im, (args.size, args.size), interpolation=cv2.INTER_AREA) for im in images]
    order = np.random.default_rng(0).permutation(len(images))
    train, held, other = order[:args.train], order[args.train:100], order[100:]
    rng = np.random.default_rng(0)

    def altered(im: np.ndarray, blur: float, cast: tuple[float, float, float], grain: float) -> np.ndarray:
        x = (cv2.GaussianBlur(im, (0, 0), blur) if blur else im).astype(np.float32) * np.array(cast, np.float32)
        return np.clip(x + rng.normal(0, grain, x.shape), 0, 255).astype(np.uint8)

    with tempfile.TemporaryDirectory() as tmp:
        w = Workdir.at(Path(tmp) / "w")
        rows = [(str(i), "bench", labels["label"][i]) for i in train]
        emb = seed_embedding(w.fidelity / "embeddings", rows, lambda sid: images[int(sid)])
        noise_rows = noise_images(w, 16, (args.size, args.size), "a dermoscopic image of {token} {label} skin lesion{transformation}", "sks")
        noise = [cv2.imread(p)[..., ::-1] for p in noise_rows["path"]]
        reference = emb.embed([images[i] for i in train])
        radiomics = lambda xs: np.stack([RA.image_features(x, 64, ["Original"])[1] for x in xs])  # noqa: E731
        ref_radiomics = radiomics([images[i] for i in train])
        unseen = [images[i] for i in other]
        sets = [("held-out real seeds (floor)", [images[i] for i in held]), ("unseen real images", unseen),
                ("blurred (sigma 2 px)", [altered(i, 2.0, (1, 1, 1), 0) for i in unseen]),
                ("colour cast (x1.15, 0.9, 0.8)", [altered(i, 0, (1.15, 0.9, 0.8), 0) for i in unseen]),
                ("blur 2 px + cast + grain", [altered(i, 2.0, (1.12, 0.92, 0.85), 8) for i in unseen]),
                ("tiny-model noise", noise)]
        print(f"{'set':32s} {'n':>3s} {'KID':>8s} {'FID':>8s} {'FRD':>6s} precision recall density coverage")
        for name, xs in sets:
            f = emb.embed(xs)
            p = D.prdc(reference, f)
            print(f"{name:32s} {len(xs):3d} {D.kid(f, reference)[0]:8.2f} {D.frechet_distance(f, reference)[0]:8.1f} "
                  f"{RA.frd(radiomics(xs), ref_radiomics)[0]:6.2f} " + " ".join(f"{p[k][0]:.2f}" for k in p))


if __name__ == "__main__":
    main()
