"""clipcap: CLIP-prefix image captioning with swappable training objectives.

The package is laid out in the order data flows through it::

    synthetic/ data/ features/ → clip/ → mapper → lm → captioner (+ generation) → objectives/ → metrics/
    training/ (the Lightning layer: module, datamodules, callbacks) and cli (LightningCLI) wire the core.
"""

__version__ = "0.1.0"
