"""Test and demo servers that ship with the package, as mitmproxy ships `mitmproxy.test`.

- `parent`: a parent proxy that checks NTLM/Negotiate passwords with pyspnego and counts
  handshakes (the tests' parent, and the one `mitm-ntlm start --demo` runs);
- `http1`: the HTTP/1 head reader that the test and benchmark servers share.
"""
