"""Authenticated-user block state: the parts behind lookupd.authblock.UserState.

decide.py is pure (names, thresholds, reply text, who may administer); store.py owns sqlite;
notify.py builds and sends the admin's mail; lsearch.py keeps the classic Exim file in sync.
"""

from __future__ import annotations
