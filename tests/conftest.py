import os
import shutil

import pytest


def pytest_collection_modifyitems(config, items):
    """e2e tests need root (namespaces) and the Debian tools; say clearly why they are skipped otherwise."""
    missing = [tool for tool in ("ip", "ping", "iperf3") if shutil.which(tool) is None]
    reason = "needs root" if os.geteuid() != 0 else (f"missing tools: {', '.join(missing)}" if missing else "")
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))
