"""Ray job entrypoint: `ray job submit --working-dir . -- python jobs/cache_logits.py CONFIG [key=value ...]`.

Thin on purpose: parses the config and calls the library. Inside a Ray job, `cluster.address: auto` joins the
cluster the job runs on.
"""

from __future__ import annotations

import sys

from kdcache.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if not args:
        sys.exit("usage: python jobs/cache_logits.py CONFIG [section.key=value ...]")
    sys.exit(main(["cache", *args]))
