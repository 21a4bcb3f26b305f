"""Fine-tuning with the MCN loss: recipes, the trainer, run folders, devices and data loaders
(docs/design.md section 3)."""
