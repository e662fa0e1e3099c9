r"""`python -m mitmproxy_ntlm ...` is `mitm-ntlm ...` (for when the venv's bin/ or Scripts\ is
not on PATH, as often on Windows)."""

import sys

from mitmproxy_ntlm.cli import main

sys.exit(main())
