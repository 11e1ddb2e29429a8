import os
import tempfile

# Tests are hermetic: no proxy from the environment may capture loopback traffic.
for _name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
    os.environ.pop(_name, None)
os.environ["NO_PROXY"] = "127.0.0.1,localhost,::1"

# Trial's mktemp() makes paths relative to the working directory: keep them out
# of the source tree.
os.chdir(tempfile.mkdtemp(prefix="llmgw-tests-"))
