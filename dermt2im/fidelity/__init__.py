"""How good is a synthetic set? Fidelity, diversity, privacy and skin tone, against the real seeds.

Pure metric code, apart from where it is stored or tracked:

* ``distances``: FID and KID (unbiased) on any embedding, precision / recall / density / coverage
  (the ``prdc`` package), each computable under bootstrap weights;
* ``bootstrap``: percentile intervals over images, the sample sizes behind them, and warnings where a
  sample is too small for the metric;
* ``radiomics``: the Fréchet Radiomics Distance, per CIELAB channel, on pyradiomics features;
* ``skin_tone``: the individual typology angle (ITA) of the skin around the lesion, and its bins;
* ``memorisation``: nearest-seed distances (the audit's global descriptor) against held-out real ones;
* ``typicality``: each image's distance to the seeds in the learned embedding, calibrated on
  held-out real images;
* ``embeddings``: one learned from the workdir's own seeds, and any local transformers model;
* ``measures``: what the quality gate records per image (typicality, skin tone; the ``atypical`` flag);
* ``report`` (the table), ``collect`` (the sets read from the workdir), ``figures``, ``text``,
  ``tracking`` (MLflow, Table IV's lines) and ``stage``: the fidelity report per generation run;
* ``card``: the dataset card that ``dermt2im export`` writes.
"""
