"""The control room: the composition above the layers. The CLI, the embedded stack, the demo,
the service runner and the pytest plugin import the ground (``pilotlab``) and the layers
(``ingest``, ``streams``, ``storage``, ``dashboards``, ``simulators``) and wire them; nothing
below imports ``control`` (tests/unit/test_layers.py, docs/architecture.md)."""

from control.stack import running_stack_env
from pilotlab import settings

# a service started by the CLI with no PILOTLAB_* endpoint set uses the embedded stack
# running in the working directory (the ground's settings know no stack)
settings.use_endpoint_defaults(running_stack_env)
