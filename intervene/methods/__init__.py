"""One package per intervention method; importing this package registers every built-in type.

Each ``intervene/methods/<name>/__init__.py`` makes one :func:`intervene.registry.register_method`
call per type it defines (docs/architecture.md, "Adding a method").
"""

import intervene.methods.das
import intervene.methods.iti
import intervene.methods.leace
import intervene.methods.patching
import intervene.methods.reft
import intervene.methods.remedi
import intervene.methods.sae_clamp
import intervene.methods.steering  # noqa: F401
