"""Whole jobs on Fashion-MNIST built on the library (docs/design.md section 6): the variant
runner of the accuracy benchmark (`fashion_mnist`) and the `mcn-compress quickstart` job
(`quickstart`). Offline and CPU-friendly; nothing here prints."""
