"""``python -m dashboards.portal``: ``pilotlab serve`` without the rest of the CLI."""

from dashboards.portal.cli import main

main()
