"""``python -m bench.peers``: the peers' standalone driver (bench/peers/try_peers.py)."""

from bench.peers.try_peers import main

raise SystemExit(main())
