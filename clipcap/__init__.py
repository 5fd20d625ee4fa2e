"""clipcap: CLIP-prefix image captioning with swappable training objectives.

The package is laid out in the order data flows through it::

    synthetic/ data/ features/ → clip/ → mapper → lm → captioner (+ generation) → objectives/ → metrics/
    training/ (the Lightning layer: module, datamodules, callbacks, the LightningCLI) wires the core, and
    commands/ holds every ``clipcap`` subcommand. docs/architecture.md draws the layers.
"""

__version__ = "0.1.0"
