"""Kerberos tickets for `Negotiate`: from a ticket cache, a keytab, or the user's password.

The `gssapi` and `krb5` packages are an optional extra (`pip install 'mitmproxy-ntlm[kerberos]'`,
which needs the system's Kerberos library); without them Negotiate carries NTLM only.

Tickets this module obtains itself (keytab or password) live in a private in-memory cache and
are renewed before they expire, so a long-running proxy never hands out an expired ticket; a
ticket cache the user filled with `kinit` is only read, and its expiry is reported clearly.
Getting a ticket talks to the KDC synchronously (milliseconds on a LAN); it happens once per
ticket lifetime, and once per parent for its service ticket, which the cache keeps.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from .credentials import Credentials
from .spnego_internals import kerberos_installed, load_kerberos, spnego

log = logging.getLogger("mitmproxy_ntlm")

# The optional extra, loaded by `_load` when Kerberos is first used (NTLM never needs it).
gssapi: Any = None
krb5: Any = None

RENEW_BEFORE = 300.0
"""Renew a ticket we own when less than this many seconds of it remain (as k5start does)."""

MAX_OWNED_TICKETS = 1000
"""Tickets we obtained kept at once (one per user in multi-user mode); the oldest go first."""

# krb5 error codes that mean the KDC refused the secret: a failed logon at the domain.
_BAD_SECRET_CODES = {
    -1765328360,  # KRB5KDC_ERR_PREAUTH_FAILED
    -1765328353,  # KRB5KRB_AP_ERR_BAD_INTEGRITY (wrong password, older KDCs)
    -1765328366,  # KRB5KDC_ERR_CLIENT_REVOKED (account locked or disabled)
}


class KerberosUnavailable(Exception):
    """Kerberos cannot be used for this exchange; the message says why (NTLM may still work)."""


class KerberosRejected(KerberosUnavailable):
    """The KDC refused the password or key: a failed logon, counted by the lockout guard."""


def available() -> bool:
    """Whether the extra is installed (it is loaded when first used)."""
    return gssapi is not None or kerberos_installed()


_NOT_INSTALLED = "the Kerberos extra is not installed (pip install 'mitmproxy-ntlm[kerberos]')"


def _load() -> None:
    """Loads the extra, for pyspnego too; KerberosUnavailable when it is not installed."""
    global gssapi, krb5
    if gssapi is None:
        if not load_kerberos():
            raise KerberosUnavailable(_NOT_INSTALLED)
        import gssapi as gssapi_module
        import krb5 as krb5_module
        gssapi, krb5 = gssapi_module, krb5_module


def _load_krb5() -> bool:
    """krb5 alone, enough to name the default ticket cache (half the extra's memory)."""
    global krb5
    if krb5 is None:
        try:
            import krb5 as krb5_module
        except ImportError:
            return False
        krb5 = krb5_module
    return True


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


@dataclass
class Ticket:
    """A usable ticket-granting ticket and where it came from (never the secret)."""

    ccache: str  # "TYPE:RESIDUAL", handed to pyspnego
    principal: str
    expires: float  # epoch seconds
    source: str  # "ticket cache FILE:/tmp/krb5cc_0", "keytab /x.keytab", "password"
    renewals: int = 0
    _handle: Any = field(default=None, repr=False)  # keeps an in-memory cache alive

    def describe(self) -> str:
        return f"ticket for {self.principal} from {self.source}, valid until {_when(self.expires)}"


@dataclass
class _Owned:
    """A ticket we obtained and a keyed digest of the secret that got it: reused only for a
    caller who presents the same secret (a user name alone must never hand out a ticket)."""

    ticket: Ticket
    proof: bytes = field(repr=False)


@dataclass
class KerberosSettings:
    """The ntlm_kerberos_* options."""

    ccache: str = ""  # "" = the default cache (KRB5CCNAME or the system default)
    keytab: str = ""
    principal: str = ""  # keytab principal; default: the user at the realm
    realm: str = ""  # set: tickets may be obtained with the user's password
    lifetime: int = 0  # requested lifetime of tickets we obtain; 0 = the KDC's default
    spn: str = ""  # "HTTP/host" or "HTTP@host"; default HTTP@<peer host>


class KerberosTickets:
    """Finds a ticket for an identity, obtaining and renewing the ones this process owns."""

    def __init__(self, settings: KerberosSettings) -> None:
        self.settings = settings
        self._owned: OrderedDict[str, _Owned] = OrderedDict()  # source:principal -> ticket
        self._proof_key = os.urandom(32)  # per process: a proof is useless outside it
        self._retired: list[Any] = []
        # The last look into a file ticket cache: (name, user, file state) -> its answer.
        self._cache_look: tuple[tuple[str, str, Any], Ticket | str] | None = None

    # ----------------------------------------------------------------- choosing a source

    def ticket(self, creds: Credentials | None, multiuser: bool) -> Ticket:
        """A valid TGT for `creds`, or KerberosUnavailable saying why there is none."""
        if not available():
            raise KerberosUnavailable(_NOT_INSTALLED)
        s = self.settings
        reasons: list[str] = []
        if not multiuser and s.keytab:
            return self._owned_ticket(self._keytab_principal(creds), keytab=s.keytab)
        if not multiuser:
            try:
                return self._cache_ticket_unless_unchanged(creds)
            except KerberosUnavailable as e:
                reasons.append(str(e))
        if creds is not None and creds.kerberos_password is not None and s.realm:
            return self._owned_ticket(self.principal_of(creds), password=creds.kerberos_password)
        if multiuser:
            reasons.append("multi-user mode needs ntlm_kerberos_realm to get each user's tickets "
                           "with their password")
        elif creds is not None and creds.has_ntlm_secret and not s.realm:
            reasons.append("set ntlm_kerberos_realm to get tickets with the password")
        raise KerberosUnavailable("; ".join(reasons))

    def principal_of(self, creds: Credentials) -> str:
        """user@REALM for an NTLM identity (the realm option wins over the NTLM domain)."""
        if "@" in creds.user:
            return creds.user
        realm = self.settings.realm or (creds.domain if "." in creds.domain else "")
        return f"{creds.user}@{realm.upper()}" if realm else creds.user

    def _keytab_principal(self, creds: Credentials | None) -> str:
        if self.settings.principal:
            return self.settings.principal
        if creds is not None and creds.user:
            return self.principal_of(creds)
        return ""  # the keytab's first entry

    def _cache_ticket_unless_unchanged(self, creds: Credentials | None) -> Ticket:
        """`_cache_ticket`, whose answer for a file cache is kept until the file changes
        (kinit, kdestroy) or the ticket nears its end: asking GSSAPI costs about 5% of the
        CPU of a passed-through tunnel, asked for every logon in `ntlm_scheme` auto. A file
        cache that does not exist holds no ticket: said without loading GSSAPI."""
        name = self.settings.ccache or os.environ.get("KRB5CCNAME", "")
        path = _ccache_file(name)
        if path is None:
            return self._cache_ticket(creds)
        try:
            st = os.stat(path)
            state: Any = (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:
            raise _no_ticket(name, f"{path} does not exist") from None
        key = (name, creds.user if creds is not None else "", state)
        look = self._cache_look
        if look is not None and look[0] == key:
            answer = look[1]
            if isinstance(answer, str):
                raise KerberosUnavailable(answer)
            if answer.expires - time.time() > RENEW_BEFORE:
                return answer
        try:
            ticket = self._cache_ticket(creds)
        except KerberosUnavailable as e:
            self._cache_look = (key, str(e))
            raise
        self._cache_look = (key, ticket)
        return ticket

    def _cache_ticket(self, creds: Credentials | None) -> Ticket:
        """The TGT in the user's ticket cache, if valid and for the configured user."""
        _load()
        name = self.settings.ccache or os.environ.get("KRB5CCNAME", "")
        store = {b"ccache": name.encode()} if name else {}
        shown = name or "the default ticket cache"
        try:
            acquired = gssapi.raw.acquire_cred_from(store, usage="initiate")
            info = gssapi.raw.inquire_cred(acquired.creds)
        except gssapi.exceptions.ExpiredCredentialsError:
            raise KerberosUnavailable(f"the ticket in {shown} has expired; run kinit") from None
        except gssapi.exceptions.GSSError as e:
            raise _no_ticket(name, _gss_reason(e)) from None
        principal = str(gssapi.Name(info.name))
        lifetime = info.lifetime or 0
        if lifetime <= 0:
            raise KerberosUnavailable(f"the ticket for {principal} in {shown} has expired; run "
                                      f"kinit {principal}")
        if creds is not None and creds.user:
            wanted = creds.user.split("@", 1)[0].lower()
            if principal.split("@", 1)[0].lower() != wanted:
                raise KerberosUnavailable(f"{shown} holds a ticket for {principal}, not for "
                                          f"{creds.user}")
        if not name:
            name = _default_ccache_name()
        return Ticket(ccache=name, principal=principal, expires=time.time() + lifetime,
                      source=f"ticket cache {name}")

    # ----------------------------------------------------------------- tickets we own

    def _owned_ticket(self, principal: str, *, keytab: str = "",
                      password: str | None = None) -> Ticket:
        key = f"{'keytab' if keytab else 'password'}:{principal.lower()}"
        proof = self._proof(keytab, password)
        current = self._owned.get(key)
        same_secret = current is not None and hmac.compare_digest(current.proof, proof)
        if current is not None and same_secret and \
                current.ticket.expires - time.time() > RENEW_BEFORE:
            self._owned.move_to_end(key)
            return current.ticket
        # A different secret asks the KDC again: a wrong one fails there and the cached
        # ticket stays with the one who knew the right one.
        ticket = self._kinit(principal, keytab=keytab, password=password)
        if current is not None and same_secret:
            ticket.renewals = current.ticket.renewals + 1
            log.info("[ntlm] Kerberos: renewed the %s", ticket.describe())
        else:
            log.info("[ntlm] Kerberos: obtained a %s", ticket.describe())
        if current is not None:
            self._retire(current.ticket)
        self._owned[key] = _Owned(ticket, proof)
        self._owned.move_to_end(key)
        while len(self._owned) > MAX_OWNED_TICKETS:
            self._retire(self._owned.popitem(last=False)[1].ticket)
        return ticket

    def _proof(self, keytab: str, password: str | None) -> bytes:
        """A digest of the secret under this process's random key, compared in constant time."""
        secret = f"keytab:{keytab}" if keytab else f"password:{password or ''}"
        return hmac.new(self._proof_key, secret.encode("utf-8", "surrogatepass"),
                        hashlib.sha256).digest()

    def _kinit(self, principal: str, *, keytab: str, password: str | None) -> Ticket:
        _load()
        ctx = krb5.init_context()
        source = f"keytab {keytab}" if keytab else "password"
        try:
            kt = krb5.kt_resolve(ctx, keytab.encode()) if keytab else None
            if kt is not None and not principal:
                entry = next(iter(kt))  # the entry owns the principal: copy it first
                princ = copy.copy(entry.principal)
            else:
                princ = krb5.parse_name_flags(ctx, principal.encode())
            opt = krb5.get_init_creds_opt_alloc(ctx)
            krb5.get_init_creds_opt_set_canonicalize(opt, True)
            krb5.get_init_creds_opt_set_forwardable(opt, False)
            if self.settings.lifetime > 0:
                krb5.get_init_creds_opt_set_tkt_life(opt, self.settings.lifetime)
            if kt is not None:
                cred = krb5.get_init_creds_keytab(ctx, princ, opt, keytab=kt)
            else:
                assert password is not None
                cred = krb5.get_init_creds_password(ctx, princ, opt,
                                                    password=password.encode("utf-8"))
            ccache = krb5.cc_new_unique(ctx, b"MEMORY")
            krb5.cc_initialize(ctx, ccache, cred.client)
            krb5.cc_store_cred(ctx, ccache, cred)
        except (krb5.Krb5Error, StopIteration, OSError) as e:
            who = principal or "the keytab's first principal"
            code = getattr(e, "err_code", None)
            if code in _BAD_SECRET_CODES:
                raise KerberosRejected(f"the KDC rejected the {source} for {who} "
                                       f"({_krb5_reason(e)})") from None
            raise KerberosUnavailable(f"cannot get a ticket for {who} with the {source} "
                                      f"({_krb5_reason(e)})") from None
        name = (ccache.cache_type or b"MEMORY") + b":" + (ccache.name or b"")
        client = cred.client.name.decode() if cred.client.name else principal
        return Ticket(ccache=name.decode(), principal=client, expires=float(cred.times.endtime),
                      source=source, _handle=(ctx, ccache))

    def _retire(self, ticket: Ticket) -> None:
        """Destroy an old in-memory cache once a newer one has also been replaced."""
        if ticket._handle is None:
            return
        self._retired.append(ticket._handle)
        while len(self._retired) > 1:
            ctx, ccache = self._retired.pop(0)
            try:
                krb5.cc_destroy(ctx, ccache)
            except Exception:  # pragma: no cover - best effort
                pass

    def forget(self) -> None:
        """Drop the tickets we own (options changed or the addon unloads)."""
        for owned in self._owned.values():
            self._retire(owned.ticket)
        self._owned.clear()

    def status(self) -> list[dict[str, Any]]:
        tickets = [owned.ticket for owned in self._owned.values()]
        return [{"principal": t.principal, "source": t.source, "expires": _when(t.expires),
                 "renewals": t.renewals} for t in tickets]

    # ----------------------------------------------------------------- service principal

    def service_for(self, peer_host: str) -> tuple[str, str]:
        """(service, host) of the principal to ask a ticket for: HTTP@peer unless overridden."""
        spn = self.settings.spn
        if "/" in spn:  # HTTP/host[@REALM]: the realm follows from the host
            service, host = spn.split("@", 1)[0].split("/", 1)
            return service, host
        if "@" in spn:  # HTTP@host
            service, host = spn.split("@", 1)
            return service, host
        return "HTTP", peer_host


class KerberosHandshake:
    """One Kerberos exchange: a single token (AP-REQ in SPNEGO) authenticates the connection."""

    single_leg = True
    mechanism = "Kerberos"

    def __init__(self, ticket: Ticket, service: str, host: str) -> None:
        self.ticket = ticket
        self.spn = f"{service}/{host}"
        self._token: bytes | None = None
        _load()
        try:
            self._ctx = spnego.client(spnego.KerberosCCache(ccache=ticket.ccache),
                                      hostname=host, service=service, protocol="negotiate")
        except Exception as e:
            raise KerberosUnavailable(f"cannot start Kerberos for {self.spn}: "
                                      f"{_spnego_reason(e)}") from None

    def negotiate(self) -> bytes:
        """The first (and normally only) token; KerberosUnavailable when no service ticket."""
        if self._token is None:
            try:
                token = self._ctx.step()
            except Exception as e:
                raise KerberosUnavailable(f"no service ticket for {self.spn} "
                                          f"({_spnego_reason(e)})") from None
            if not token:
                raise KerberosUnavailable(f"gssapi produced no token for {self.spn}")
            self._token = token
        return self._token

    def mutual(self, token: bytes) -> bool:
        """Check the peer's answer token (mutual authentication); False when it does not verify."""
        try:
            self._ctx.step(token)
        except Exception:
            return False
        return True


def _no_ticket(ccache: str, why: str) -> KerberosUnavailable:
    """The ticket cache `ccache` ("": the default one) holds no ticket, for reason `why`."""
    return KerberosUnavailable(f"no ticket in {ccache or 'the default ticket cache'} ({why}); "
                               f"run kinit or set ntlm_kerberos_keytab")


def _gss_reason(e: Exception) -> str:
    text = getattr(e, "gen_message", None)
    minor = ""
    try:
        minor = e.get_all_statuses(e.min_code, False)[0]  # type: ignore[attr-defined]
    except Exception:
        pass
    return str(minor or (text() if callable(text) else e)).strip()


def _krb5_reason(e: Exception) -> str:
    return str(getattr(e, "message", b"") or e).strip("b'\" ")


def _spnego_reason(e: Exception) -> str:
    text = str(e)
    if "Minor" in text:
        text = text.split("Minor", 1)[1].split(":", 1)[-1]
    return text.split(", Context:", 1)[0].strip() or type(e).__name__


def _ccache_file(name: str) -> str | None:
    """The file of a FILE: ticket cache (the default when unnamed, on Linux and BSD:
    /tmp/krb5cc_UID), None for other kinds (KCM:, KEYRING:, DIR:, API:)."""
    if not name:
        if not hasattr(os, "getuid"):
            return None
        return f"/tmp/krb5cc_{os.getuid()}" if _default_is_uid_file() else None
    kind, sep, rest = name.partition(":")
    if not sep or len(kind) == 1:  # a bare path (or a Windows drive letter)
        return name
    return rest if kind.upper() == "FILE" else None


_DEFAULT_FILE: bool | None = None


def _default_is_uid_file() -> bool:
    """Whether the system's default ticket cache is /tmp/krb5cc_UID (krb5.conf may say
    otherwise); asked once per process."""
    global _DEFAULT_FILE
    if _DEFAULT_FILE is None:
        _DEFAULT_FILE = _load_krb5() and \
            _default_ccache_name() == f"FILE:/tmp/krb5cc_{os.getuid()}"
    return _DEFAULT_FILE


def _default_ccache_name() -> str:
    try:
        ctx = krb5.init_context()
        cc = krb5.cc_default(ctx)
        return ((cc.cache_type or b"FILE") + b":" + (cc.name or b"")).decode()
    except Exception:  # pragma: no cover - the cache was just read
        uid = os.getuid() if hasattr(os, "getuid") else "UID"  # no getuid on Windows
        return f"FILE:/tmp/krb5cc_{uid}"
