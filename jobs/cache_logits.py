"""Ray job entrypoint: `ray job submit --working-dir . -- python jobs/cache_logits.py CONFIG [key=value ...]`.

Thin on purpose: parses the config and calls the library (`kdcache cache`). Inside a Ray job, `cluster.address:
null` (or `auto`) joins the cluster the job runs on, and a local input missing from the uploaded working_dir (Ray
leaves out .gitignore'd files and runtime_env excludes) fails naming its config key. `kdcache submit` checks the
config's local paths before it submits (kdcache/submit.py).
"""

from __future__ import annotations

import sys

from kdcache.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if not args:
        sys.exit("usage: python jobs/cache_logits.py CONFIG [section.key=value ...]")
    sys.exit(main(["cache", *args]))
