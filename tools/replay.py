#!/usr/bin/env python3
"""Replay generated or archived Engine traffic at a log server; see `--help`.

The same tool as `mwdlogd replay`, for use from a checkout.
"""

from mwdlogd.replay import main

if __name__ == "__main__":
    raise SystemExit(main())
