"""The ClientApp the app bundle names (``clients.app:app``): fedslm's node, from the installed package.

In a simulation this is what Flower's engine runs. A deployed node never runs the bundle's code: it
is started with ``fedslm node start``, whose runtime runs fedslm.node.app from the node's own
installation whatever bundle the coordinator pushed (fedslm.node.runtime). A node started with a
plain ``flower-supernode`` that loads this bundle refuses every round, so the unsafe setup cannot
work by accident.
"""

from fedslm.node.app import app

__all__ = ["app"]
