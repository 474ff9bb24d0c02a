"""The control room: the composition above the layers. The CLI, the embedded stack, the demo,
the service runner and the pytest plugin import the ground (``pilotlab``) and the layers
(``ingest``, ``streams``, ``storage``, ``dashboards``, ``simulators``) and wire them; nothing
below imports ``control`` (tests/unit/test_layers.py, docs/architecture.md)."""
