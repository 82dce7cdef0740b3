"""Training of memorizing models: the embedded default from scratch, and fine-tuning with duplicated images."""

# Modules: ``shapes`` (procedural generic images and captions), ``attributes`` (reading attributes
# back from pixels), ``photos`` (the memorized scikit-image photos), ``tokenizer`` (our CLIP-format
# tokenizer), ``models`` (sizes, builders, saving), ``loop`` (CUDA-graph training loop), ``vae`` and
# ``denoiser`` (training steps), ``manifest`` (what a model memorized), ``measure`` (near copies,
# attribute accuracy, diversity), ``scratch`` and ``finetune`` (whole runs), ``resume`` (loading a saved
# model to continue its training), ``report``, ``pack``.
