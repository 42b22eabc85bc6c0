"""Authenticated-user block state, the whole feature in one place.

state.py is the source (UserState: the verbs, the in-memory mirror, fail open); decide.py is
pure (names, thresholds, reply text, who may administer); store.py owns sqlite; shared.py is
the Redis side ([cluster]); notify.py builds and sends the admin's mail; lsearch.py keeps the
classic Exim file in sync; cli.py is `lookupd users`.
"""

from __future__ import annotations
