"""The mitmproxy addon: NTLM authentication to the parent proxy in upstream mode.

Options are validated in `configure`; the connection work happens in the layer installed by
`mitmproxy_internals`. This class owns the policy (credentials, lockout guard) and puts each
flow's authentication story on the flow for mitmweb and the console.
"""

from __future__ import annotations

import logging
import os
import socket
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from mitmproxy import command, ctx, exceptions, http
from mitmproxy.addonmanager import Loader
from mitmproxy.hooks import UpdateHook

from . import kerberos, messages, mitmproxy_internals
from .bounded import bounded_set
from .credentials import (
    CredentialError,
    Credentials,
    SecretSources,
    build_credentials,
    kerberos_only,
)
from .handshake import Dialect, quiet_spnego_logs
from .kerberos import KerberosSettings, KerberosTickets, KerberosUnavailable
from .legflows import leg_flows
from .multiuser import ClientLogins
from .policy import AuthUnavailable, LockoutGuard, UpstreamPolicy
from .pool import ParentPool
from .schemes import SchemeChooser, SchemeMode
from .trace import HandshakeTrace

log = logging.getLogger("mitmproxy_ntlm")

CREDENTIAL_OPTIONS = (
    "ntlm_username",
    "ntlm_domain",
    "ntlm_workstation",
    "ntlm_password",
    "ntlm_password_env",
    "ntlm_password_file",
    "ntlm_pass_nt",
    "ntlm_pass_lm",
    "ntlm_hashes",
    "ntlm_dialect",
    "ntlm_max_failures",
    "ntlm_handshake_timeout",
    "ntlm_replay_limit",
    "ntlm_multiuser",
    "ntlm_realm",
    "ntlm_lockout_cooldown",
    "ntlm_scheme",
    "ntlm_kerberos_ccache",
    "ntlm_kerberos_keytab",
    "ntlm_kerberos_principal",
    "ntlm_kerberos_realm",
    "ntlm_kerberos_spn",
    "ntlm_kerberos_lifetime",
    "proxyauth",
)
POOL_OPTIONS = ("ntlm_pool", "ntlm_pool_idle", "ntlm_pool_max", "ntlm_pool_connections",
                "ntlm_pool_wait", "ntlm_pool_grace")


class NtlmUpstreamAuth:
    """Authenticates mitmproxy's connections to the parent proxy with NTLM."""

    def __init__(self) -> None:
        self.policy: UpstreamPolicy | None = None
        self.logins: ClientLogins | None = None
        # CONNECT flows waiting for their tunnel's handshake (it runs after mitmproxy's 200).
        self._connect_flows: OrderedDict[str, http.HTTPFlow] = OrderedDict()
        self.tickets: KerberosTickets | None = None
        # Set by script.AddonGroup: ask it again which hooks are idle.
        self.hooks_changed: Callable[[], None] | None = None

    def load(self, loader: Loader) -> None:
        quiet_spnego_logs()
        loader.add_option("ntlm_username", str, "",
                          "User name for the parent proxy: user, DOMAIN\\user or user@domain.")
        loader.add_option("ntlm_domain", str, "", "NTLM domain (overrides a domain in the name).")
        loader.add_option("ntlm_workstation", str, socket.gethostname().split(".")[0].upper(),
                          "Workstation name sent in the NTLM Type 3 message.")
        loader.add_option("ntlm_password_file", str, "",
                          "File holding the password on its first line; must be mode 0600.")
        loader.add_option("ntlm_password_env", str, "",
                          "Name of an environment variable holding the password.")
        loader.add_option("ntlm_pass_nt", str, "",
                          "PassNT hash exactly as printed by `cntlm -H` / `mitm-ntlm hash`.")
        loader.add_option("ntlm_pass_lm", str, "",
                          "PassLM hash as printed by `cntlm -H` (only used by ntlmv1).")
        loader.add_option("ntlm_hashes", str, "",
                          "Standard NT hash, or LM:NT, in hex (impacket/pyspnego form).")
        loader.add_option("ntlm_password", str, "",
                          "The password itself. Visible in the process list when given with "
                          "--set: prefer ntlm_password_file or ntlm_password_env.")
        loader.add_option("ntlm_dialect", str, Dialect.NTLMV2.value,
                          "NTLM response dialect. ntlmv2 is the default; ntlm2sr and ntlmv1 are "
                          "weak and only for parents that refuse NTLMv2.",
                          choices=[d.value for d in Dialect])
        loader.add_option("ntlm_max_failures", int, 3,
                          "Stop sending the credentials after this many consecutive rejections "
                          "by the parent (protects the account from lockout); 0 disables.")
        loader.add_option("ntlm_handshake_timeout", int, 30,
                          "Seconds to wait for the parent during an NTLM handshake.")
        loader.add_option("ntlm_replay_limit", int, 16 * 1024 * 1024,
                          "Largest request body kept to resend after a re-challenge (bytes).")
        loader.add_option("ntlm_multiuser", bool, False,
                          "Multi-user mode: clients send Proxy-Authorization: Basic with their "
                          "own DOMAIN\\user and password, used for NTLM towards the parent. "
                          "ntlm_domain is the default domain.")
        loader.add_option("ntlm_realm", str, "mitmproxy-ntlm",
                          "Realm of the Basic challenge sent to clients in multi-user mode.")
        loader.add_option("ntlm_lockout_cooldown", int, 300,
                          "Multi-user mode: seconds a user's credentials stay blocked after "
                          "ntlm_max_failures consecutive rejections.")
        loader.add_option("ntlm_scheme", str, SchemeMode.AUTO.value,
                          "auto: Kerberos (Negotiate) when a ticket is available and the peer "
                          "offers Negotiate, else NTLM; kerberos or ntlm pin one scheme.",
                          choices=[m.value for m in SchemeMode])
        loader.add_option("ntlm_kerberos_ccache", str, "",
                          "Kerberos ticket cache filled by kinit, e.g. FILE:/tmp/krb5cc_1000 "
                          "(default: KRB5CCNAME or the system default). Without ntlm_username "
                          "the cache's principal is the identity.")
        loader.add_option("ntlm_kerberos_keytab", str, "",
                          "Client keytab to get (and renew) Kerberos tickets from, instead of a "
                          "ticket cache.")
        loader.add_option("ntlm_kerberos_principal", str, "",
                          "Principal in ntlm_kerberos_keytab (default: ntlm_username at the "
                          "realm, else the keytab's first entry).")
        loader.add_option("ntlm_kerberos_realm", str, "",
                          "Kerberos realm (e.g. CORP.EXAMPLE.COM). When set, tickets are "
                          "obtained and renewed with the NTLM password (kept in memory for "
                          "that), also for each user in multi-user mode.")
        loader.add_option("ntlm_kerberos_spn", str, "",
                          "Service principal of the parent, e.g. HTTP/proxy.corp.example "
                          "(default: HTTP/ and the parent's host name as given in --mode).")
        loader.add_option("ntlm_kerberos_lifetime", int, 0,
                          "Lifetime in seconds to ask for tickets obtained with a keytab or "
                          "password (0: the KDC's default); they are renewed 5 minutes before "
                          "they expire.")
        loader.add_option("ntlm_pool", bool, True,
                          "Keep idle authenticated plain-http parent connections in a pool shared "
                          "by all client connections, per parent and per user (never across "
                          "users), so a new client connection needs no new NTLM handshake (no new "
                          "logon at the domain controller). Also carries CONNECTs where the parent "
                          "allows it. https:// parents are not pooled.")
        loader.add_option("ntlm_pool_idle", int, 30,
                          "Seconds an idle pooled parent connection is kept; keep it below the "
                          "parent's own idle timeout (Squid: 120 s).")
        loader.add_option("ntlm_pool_max", int, 32,
                          "Most idle pooled parent connections kept in all (oldest closed first).")
        loader.add_option("ntlm_pool_connections", int, 16,
                          "Most plain-http parent connections per parent and user (0: no limit). "
                          "Requests borrow them one at a time, as with CNTLM and Px; a request "
                          "that finds them all busy waits for one (ntlm_pool_wait) instead of "
                          "logging on again.")
        loader.add_option("ntlm_pool_wait", int, 5,
                          "Seconds a request waits for a busy parent connection of its user "
                          "(ntlm_pool_connections) before it opens another one.")
        loader.add_option("ntlm_pool_grace", int, 50,
                          "Milliseconds a request waits for a busy parent connection of its "
                          "user when it finds none idle (and fewer than ntlm_pool_connections "
                          "open) before it opens another one, i.e. logs on again. Busy "
                          "connections usually come free within milliseconds; 0: never wait.")
        loader.add_option("ntlm_show_legs", bool, False,
                          "Show the hidden handshake legs (407s, Type 1/2/3) as flows of their "
                          "own in mitmweb and the console; Type 3 responses are redacted.")

    def configure(self, updated: set[str]) -> None:
        if updated & set(POOL_OPTIONS) and not updated & set(CREDENTIAL_OPTIONS):
            self._configure_pool()
        if not updated & set(CREDENTIAL_OPTIONS) and self.policy is not None:
            return
        opts = ctx.options
        self._configure_kerberos()
        if opts.ntlm_multiuser:
            self._configure_multiuser()
            return
        if not opts.ntlm_username:
            creds = self._kerberos_identity()
            if creds is None:
                self.policy = None
                self.logins = None
                mitmproxy_internals.uninstall()
                return
            self.logins = None
            self._install(creds=creds, guard=LockoutGuard(opts.ntlm_max_failures))
            log.info("[ntlm] Kerberos only, as %s, to the parent proxy", creds.principal)
            return
        try:
            creds = build_credentials(
                opts.ntlm_username,
                opts.ntlm_domain,
                opts.ntlm_workstation,
                SecretSources(
                    password=opts.ntlm_password,
                    password_env=opts.ntlm_password_env,
                    password_file=opts.ntlm_password_file,
                    pass_nt=opts.ntlm_pass_nt,
                    pass_lm=opts.ntlm_pass_lm,
                    hashes=opts.ntlm_hashes,
                ),
                keep_password=self._tickets_from_passwords(),
            )
        except CredentialError as e:
            raise exceptions.OptionsError(f"mitmproxy-ntlm: {e}") from None
        if opts.ntlm_password:
            log.warning("[ntlm] ntlm_password is set in the options: other local users can see "
                        "it in the process list; prefer ntlm_password_file or ntlm_pass_nt")
        self.logins = None
        self._install(creds=creds, guard=LockoutGuard(opts.ntlm_max_failures))
        log.info("[ntlm] %s as %s to the parent proxy (workstation %s)",
                 self._dialect().label, creds.principal, creds.workstation)

    def _configure_multiuser(self) -> None:
        opts = ctx.options
        given = [name for name in ("ntlm_username", "ntlm_password", "ntlm_password_env",
                                   "ntlm_password_file", "ntlm_pass_nt", "ntlm_hashes")
                 if getattr(opts, name)]
        if given:
            raise exceptions.OptionsError(
                f"ntlm_multiuser takes each user's credentials from the clients; remove "
                f"{', '.join(given)} (a fixed identity would be handed to every client)")
        if opts.proxyauth and not all(str(m).startswith("socks5") for m in opts.mode):
            raise exceptions.OptionsError(
                "ntlm_multiuser reads the clients' Basic credentials itself and cannot be "
                "combined with proxyauth (which removes them before this addon sees them). "
                "Only a SOCKS5-only instance needs proxyauth (e.g. --set proxyauth=any), because "
                "mitmproxy asks SOCKS5 clients for a password only when it is set.")
        self._install(creds=None, guard=LockoutGuard(opts.ntlm_max_failures,
                                                     cooldown=float(opts.ntlm_lockout_cooldown)))
        assert self.policy is not None
        self.logins = ClientLogins(self.policy, opts.ntlm_domain, opts.ntlm_workstation.upper(),
                                   keep_passwords=self._tickets_from_passwords())
        log.info("[ntlm] multi-user mode: clients authenticate with Basic, %s towards the parent "
                 "(default domain %s)", self._dialect().label, opts.ntlm_domain or "none")

    def _dialect(self) -> Dialect:
        return Dialect(ctx.options.ntlm_dialect)

    def _configure_kerberos(self) -> None:
        """Validate the Kerberos options; a fresh ticket store (tickets we own are dropped)."""
        opts = ctx.options
        mode = SchemeMode(opts.ntlm_scheme)
        asked = [name for name in ("ntlm_kerberos_ccache", "ntlm_kerberos_keytab",
                                   "ntlm_kerberos_realm") if getattr(opts, name)]
        if mode is not SchemeMode.NTLM and (asked or mode is SchemeMode.KERBEROS) \
                and not kerberos.available():
            raise exceptions.OptionsError(
                f"mitmproxy-ntlm: {', '.join(asked) or 'ntlm_scheme=kerberos'} needs the Kerberos "
                f"extra: pip install 'mitmproxy-ntlm[kerberos]' (it builds gssapi against the "
                f"system's Kerberos library: apt-get install libkrb5-dev, or brew install krb5)")
        if opts.ntlm_kerberos_keytab and not os.path.isfile(opts.ntlm_kerberos_keytab):
            raise exceptions.OptionsError(
                f"mitmproxy-ntlm: ntlm_kerberos_keytab {opts.ntlm_kerberos_keytab} does not exist")
        if opts.ntlm_kerberos_lifetime < 0:
            raise exceptions.OptionsError("ntlm_kerberos_lifetime must be 0 or more")
        if self.tickets is not None:
            self.tickets.forget()
        self.tickets = KerberosTickets(KerberosSettings(
            ccache=opts.ntlm_kerberos_ccache,
            keytab=opts.ntlm_kerberos_keytab,
            principal=opts.ntlm_kerberos_principal,
            realm=opts.ntlm_kerberos_realm,
            lifetime=opts.ntlm_kerberos_lifetime,
            spn=opts.ntlm_kerberos_spn,
        ))

    def _tickets_from_passwords(self) -> bool:
        opts = ctx.options
        return bool(opts.ntlm_kerberos_realm) and opts.ntlm_scheme != SchemeMode.NTLM.value

    def _kerberos_identity(self) -> Credentials | None:
        """Without ntlm_username: the identity of a configured ticket cache or keytab."""
        opts = ctx.options
        mode = SchemeMode(opts.ntlm_scheme)
        wanted = opts.ntlm_kerberos_ccache or opts.ntlm_kerberos_keytab or \
            mode is SchemeMode.KERBEROS
        if mode is SchemeMode.NTLM or not wanted:
            return None
        assert self.tickets is not None
        principal = opts.ntlm_kerberos_principal
        if not principal:
            try:
                principal = self.tickets.ticket(None, multiuser=False).principal
            except KerberosUnavailable as e:
                log.warning("[ntlm] Kerberos: %s (requests fail until there is a ticket)", e)
        return kerberos_only(principal or "the ticket cache's principal",
                             opts.ntlm_workstation)

    def _install(self, creds: Credentials | None, guard: LockoutGuard) -> None:
        """Validate the shared options and route parent connections through the NTLM layer."""
        opts = ctx.options
        if opts.ntlm_handshake_timeout <= 0:
            raise exceptions.OptionsError("ntlm_handshake_timeout must be positive")
        if opts.ntlm_max_failures < 0:
            raise exceptions.OptionsError("ntlm_max_failures must be 0 or more")
        try:
            mitmproxy_internals.check_version()
        except mitmproxy_internals.UnsupportedMitmproxy as e:
            raise exceptions.OptionsError(str(e)) from None
        dialect = self._dialect()
        if dialect is not Dialect.NTLMV2:
            log.warning("[ntlm] ntlm_dialect=%s is weak (crackable responses); use it only for a "
                        "parent that refuses NTLMv2", dialect.value)
        assert self.tickets is not None
        self.policy = UpstreamPolicy(
            creds=creds,
            chooser=SchemeChooser(SchemeMode(opts.ntlm_scheme), dialect, self.tickets),
            dialect=dialect,
            guard=guard,
            replay_limit=opts.ntlm_replay_limit,
            handshake_timeout=float(opts.ntlm_handshake_timeout),
            multiuser=opts.ntlm_multiuser,
            realm=opts.ntlm_realm,
            rejected_ttl=float(opts.ntlm_lockout_cooldown),
            on_finished=self._handshake_finished,
        )
        guard.on_block = self._hooks_changed  # requestheaders must refuse from now on
        mitmproxy_internals.install(self.policy)
        self._configure_pool()

    def _configure_pool(self) -> None:
        """(Re)build the connection pool: a new policy or pool option drops pooled connections."""
        opts = ctx.options
        if min(opts.ntlm_pool_idle, opts.ntlm_pool_max, opts.ntlm_pool_connections,
               opts.ntlm_pool_wait, opts.ntlm_pool_grace) < 0:
            raise exceptions.OptionsError("ntlm_pool_idle, ntlm_pool_max, ntlm_pool_connections, "
                                          "ntlm_pool_wait and ntlm_pool_grace must be 0 or more")
        if self.policy is None or not opts.ntlm_pool or not opts.ntlm_pool_idle \
                or not opts.ntlm_pool_max:
            mitmproxy_internals.set_pool(None)
            return
        mitmproxy_internals.set_pool(ParentPool(
            float(opts.ntlm_pool_idle), opts.ntlm_pool_max,
            per_key=opts.ntlm_pool_connections, wait_timeout=float(opts.ntlm_pool_wait),
            grace=opts.ntlm_pool_grace / 1000))

    def running(self) -> None:
        if self.policy is None:
            log.warning("[ntlm] ntlm_username is not set: mitmproxy-ntlm is idle")
        elif not _upstream_mode() and not ctx.options.ntlm_parent:
            log.info("[ntlm] NTLM is used only towards a parent proxy: --mode upstream:URL, "
                     "or ntlm_parent in regular/socks5 mode")

    def done(self) -> None:
        mitmproxy_internals.uninstall()
        if self.tickets is not None:
            self.tickets.forget()

    def socks5_auth(self, data: Any) -> None:
        """SOCKS5 username/password (offered when proxyauth is set) become the identity."""
        if self.logins is None:
            return
        problem = self.logins.pin(data.client_conn, data.username, data.password)
        data.valid = problem is None and data.valid
        if problem:
            log.warning("[ntlm] SOCKS5 client refused: %s", problem)

    def idle_hooks(self) -> set[str]:
        """Hooks with nothing to do now (see script.AddonGroup). `requestheaders` only refuses
        known-bad credentials: it is offered again when the lockout guard blocks someone."""
        idle = set() if self.logins is not None else {"client_disconnected"}
        if self.policy is None:
            idle |= {"requestheaders", "http_connect", "response", "error"}
        elif not self.policy.may_refuse():
            idle.add("requestheaders")
        return idle

    def _hooks_changed(self) -> None:
        if self.hooks_changed is not None:
            self.hooks_changed()

    def client_disconnected(self, client: Any) -> None:
        if self.logins is not None:
            self.logins.forget(client.id)

    # Known-bad credentials: answer at once instead of opening a parent connection.

    def _blocked_reason(self, client_id: str | None = None) -> str | None:
        if self.policy is None:
            return None
        try:
            self.policy.credentials(client_id)
        except AuthUnavailable as e:
            return str(e)
        return None

    def _refuse(self, flow: http.HTTPFlow, reason: str) -> None:
        assert self.policy is not None
        status, headers = self.policy.failure_response()
        flow.response = http.Response.make(
            status, reason + "\n", {"Content-Type": "text/plain", **headers})
        self._mark_failed(flow, reason)

    def _check_client(self, flow: http.HTTPFlow) -> bool:
        """Multi-user login and known-bad credentials, before any parent connection opens."""
        if self.policy is None or flow.response:
            return False
        if self.logins is not None:
            problem = self.logins.authenticate(flow)
            if problem:
                self._refuse(flow, problem)
                return False
        reason = self._blocked_reason(flow.client_conn.id if self.policy.multiuser else None)
        if reason:
            self._refuse(flow, reason)
            return False
        return True

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        policy = self.policy
        if policy is None or not policy.may_refuse():
            self._hooks_changed()  # nothing known bad (any more): not needed per request
            return
        if _to_parent(flow):
            self._check_client(flow)

    def http_connect(self, flow: http.HTTPFlow) -> None:
        if self.policy is None or not _to_parent(flow):
            return
        if not self._check_client(flow):
            return
        bounded_set(self._connect_flows, flow.server_conn.id, flow, 1000)

    def _handshake_finished(self, trace: HandshakeTrace, client: Any, server: Any) -> None:
        """Called by the layer when a handshake ends: annotate the CONNECT, show the legs."""
        connect_flow = self._connect_flows.pop(trace.key, None) if trace.key else None
        view = ctx.master.addons.get("view")
        if connect_flow is not None:
            self._annotate(connect_flow)
            if view is not None and not trace.ok and view.get_by_id(connect_flow.id) is None:
                # mitmproxy lists no CONNECT flows; a failed tunnel must not stay invisible.
                view.add([connect_flow])
            else:
                ctx.master.addons.trigger(UpdateHook([connect_flow]))
        if ctx.options.ntlm_show_legs and view is not None:
            flows = leg_flows(trace, client, server)
            if flows:
                view.add(flows)

    # The story of each flow, for mitmweb / console / mitmdump.

    def _annotate(self, flow: http.HTTPFlow) -> None:
        policy = self.policy
        if policy is None or "ntlm" in flow.metadata:
            return
        traces = policy.traces
        origin = traces.get(f"{flow.server_conn.id}/origin")
        if origin is not None and "ntlm_origin" not in flow.metadata:
            metadata, comment, _ = origin.annotation()
            flow.metadata["ntlm_origin"] = metadata
            flow.comment = flow.comment or comment
        trace = traces.get(flow.server_conn.id)
        if trace is None or trace.result == "pending":
            return
        metadata, comment, ok = trace.annotation()
        flow.metadata["ntlm"] = metadata
        if not flow.comment:
            flow.comment = comment
        if not ok:
            flow.marked = ":warning:"

    response = error = _annotate  # hooks called for every flow: no extra call in between

    @staticmethod
    def _mark_failed(flow: http.HTTPFlow, reason: str) -> None:
        flow.metadata["ntlm"] = {"result": "blocked", "reason": reason}
        flow.comment = reason
        flow.marked = ":warning:"

    # Commands.

    @command.command("ntlm.reset")
    def reset(self) -> None:
        """Re-enable credentials disabled by the lockout guard."""
        if self.policy is not None:
            self.policy.guard.reset()
            self.policy.rejected.clear()
            log.info("[ntlm] lockout guard reset: credentials will be sent again")

    @command.command("ntlm.decode")
    def decode(self, token: str) -> str:
        """Decode an NTLM token (base64, optionally prefixed with NTLM); responses are not shown."""
        return messages.one_line(messages.describe_b64(token))

    @command.command("ntlm.status")
    def status(self) -> str:
        """Parents, users (no secrets), handshakes, rejections, lockouts, recent handshakes."""
        policy = self.policy
        if policy is None:
            return "mitmproxy-ntlm: idle (set ntlm_username, or ntlm_multiuser)"
        if policy.creds is not None:
            users = [policy.creds.principal]
            mode = f"single user ({policy.dialect.label})"
        else:
            users = sorted({c.principal for c in policy.identities.values()})
            mode = (f"multi-user, {len(policy.identities)} client connections "
                    f"({policy.dialect.label})")
        traces = list(policy.traces.values())
        results: dict[str, int] = {}
        for t in traces:
            results[t.result] = results.get(t.result, 0) + 1
        lines = [
            f"parents: {', '.join(str(m) for m in ctx.options.mode)}",
            f"mode: {mode}",
            "handshakes: " + (", ".join(f"{n} {r}" for r, n in sorted(results.items())) or "none"),
        ]
        pool = mitmproxy_internals.NtlmUpstreamProxy.pool
        if pool is None:
            lines.append("pool: off")
        else:
            st = pool.stats
            per = f", {pool.per_key} per user" if pool.per_key else ""
            lines.append(f"pool: {len(pool)} idle (max {pool.max_idle}, {pool.idle_timeout:g} s"
                         f"{per}); {st.reused} reused, {st.released} returned, {st.expired} "
                         f"expired, {st.dead} closed by the parent, {st.evicted} evicted, "
                         f"{st.waited} waited ({st.wait_timeouts} in vain), {st.graced} "
                         f"waited up to {pool.grace * 1000:g} ms ({st.grace_timeouts} in vain), "
                         f"{st.salvaged} read to the end after their client left "
                         f"({st.salvage_failed} closed instead)")
        for user in users:
            blocked = " BLOCKED (lockout guard)" if policy.guard.blocked(user) else ""
            lines.append(f"user {user}: {policy.guard.failures(user)} consecutive rejections of "
                         f"{policy.guard.limit}{blocked}")
        assert policy.chooser is not None
        lines.append(f"scheme: {policy.chooser.mode.value}")
        if self.tickets is not None:
            lines += [f"Kerberos ticket {t['principal']} from {t['source']}, valid until "
                      f"{t['expires']}, renewed {t['renewals']} times"
                      for t in self.tickets.status()]
        lines += [f"  {t.client} -> {t.parent} {t.kind}: {t.result}"
                  + (f" [{t.dialect}]" if t.dialect else "") for t in traces[-5:]]
        return "\n".join(lines)


def _to_parent(flow: http.HTTPFlow) -> bool:
    """The flow goes through a parent: upstream mode, or routed by ParentRouter (via set)."""
    return flow.server_conn.via is not None or _upstream_mode()


def _upstream_mode() -> bool:
    modes: Any = ctx.options.mode
    return any(str(m).startswith("upstream:") for m in modes)
