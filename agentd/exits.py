"""The ``agentd`` command's exit codes, named once (README has the same table). [leaf]

===  ==========================================================
0    success
1    unexpected error (bug, storage trouble)
2    usage or configuration error
3    not connected (no tokens for the provider)
4    re-authorization required (grant revoked/expired): connect again
5    provider unavailable (network, 5xx, 429, TLS): try again later
6    the authorization flow failed, was denied or expired
130  interrupted (Ctrl-C)
141  standard output closed early (e.g. piped into ``head``)
===  ==========================================================

Imported by the parser (cli.py), the commands and the daemon alike; it imports nothing of
the project, so none of them has to import another for a number.
"""

from __future__ import annotations

__all__ = ["ALWAYS", "EXIT", "EXIT_MEANINGS"]

EXIT = {
    "ok": 0,
    "error": 1,
    "usage": 2,
    "not_connected": 3,
    "reauthorize": 4,
    "unavailable": 5,
    "flow_failed": 6,
    "interrupted": 130,
    "broken_pipe": 141,
}

#: what each exit code means, for ``--help`` (README has the same table)
EXIT_MEANINGS = {
    0: "success",
    1: "unexpected error (storage trouble, or a bug)",
    2: "usage or configuration error",
    3: "not connected: no tokens for the provider",
    4: "re-authorization required: connect again",
    5: "unavailable: the provider or the daemon cannot be reached; try later",
    6: "the authorization was denied, failed or the link expired",
    130: "interrupted (Ctrl-C)",
    141: "standard output closed early (e.g. piped into head)",
}
#: codes every command may end with, named once in each command's help
ALWAYS = (1, 130, 141)
