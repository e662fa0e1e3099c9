"""The mitmproxy addon: NTLM authentication to the parent proxy in upstream mode.

Options are validated in `configure`; the connection work happens in the layer installed by
`layers.upstream`. This class makes the policy and the pool (kept in the `Runtime` that the
layers read) (credentials, lockout guard) and puts each
flow's authentication story on the flow for mitmweb and the console.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from mitmproxy import command, ctx, exceptions, http, types
from mitmproxy.addonmanager import Loader
from mitmproxy.hooks import UpdateHook

from . import authview, config_file, kerberos, mitmproxy_internals, options, winbind
from .bounded import bounded_set
from .credentials import (
    CredentialError,
    Credentials,
    SecretSources,
    build_credentials,
    kerberos_only,
    principal_of,
)
from .handshake import Dialect, quiet_spnego_logs
from .kerberos import KerberosSettings, KerberosTickets, KerberosUnavailable
from .layers.upstream import answer_failed_tunnel
from .legflows import leg_flows, parent_answer
from .multiuser import ClientLogins
from .policy import RECENT_TRACES, AuthUnavailable, Guard, UpstreamPolicy, new_guard
from .pool import ParentPool
from .proxy_credentials import drop_client_proxy_credentials, relayed_to_parent
from .report import build_report, write_report
from .runtime import Runtime
from .schemes import SchemeChooser, SchemeMode
from .secret_reload import SIGHUP, SecretReloader
from .trace import HandshakeTrace
from .untrusted import PAGE_LIMIT, escape_log_records, shown
from .userfile import FileRefused, stat_regular_file

log = logging.getLogger("mitmproxy_ntlm")

# Marks in the flow list (mitmproxy's emoji names; README "Seeing what happens"): the flow
# that carried a new handshake, one sent on a pooled connection, a failure.
MARKS = {"authenticated": ":key:", "reused": ":recycle:"}


def refuse_secret_options_in_web(opts: Any) -> None:
    """mitmweb hands every option's value to its options editor and API (GET /options): no
    secret may be an option there. Refusing rolls the value back out of the options store."""
    if "web_port" not in opts:  # declared by mitmweb's own addon only
        return
    given = [name for name in options.SECRET if getattr(opts, name)]
    if given:
        raise exceptions.OptionsError(
            f"mitmproxy-ntlm: under mitmweb, {' and '.join(given)} would be shown to anyone who "
            f"can open mitmweb (its options editor and API show every option); put the password "
            f"in a file named by ntlm_password_file (mode 0600), in an environment variable "
            f"named by ntlm_password_env or in the OS keyring (ntlm_password_keyring) instead")


class NtlmUpstreamAuth:
    """Authenticates mitmproxy's connections to the parent proxy with NTLM."""

    def __init__(self, runtime: Runtime | None = None) -> None:
        self.runtime = runtime if runtime is not None else Runtime()
        self.logins: ClientLogins | None = None
        # CONNECT flows waiting for their tunnel's handshake (it runs after mitmproxy's 200).
        self._connect_flows: OrderedDict[str, http.HTTPFlow] = OrderedDict()
        # Handshakes whose legs wait for the first flow on their connection (ntlm_show_legs).
        self._pending_legs: OrderedDict[str, tuple[HandshakeTrace, Any, Any]] = OrderedDict()
        self.tickets: KerberosTickets | None = None
        self.reloader = SecretReloader(self.reload_secrets, self.reload_on_hangup)
        self._config_names: set[str] = set()  # the options ntlm_config set when last read
        self._running = False  # past start-up: option changes come from the user

    def load(self, loader: Loader) -> None:
        quiet_spnego_logs()
        escape_log_records()
        options.declare(loader, options.UPSTREAM)

    def configure(self, updated: set[str]) -> None:
        if "ntlm_config" in updated:
            applied = self.apply_config_file()  # configured just now, by a nested configure
            if applied & options.READ_BY_POLICY:
                applied |= options.READ_BY_POLICY
            updated = updated - applied
        if updated & options.READ_BY_POOL and not updated & options.READ_BY_POLICY:
            self._configure_pool()
        elif "connection_strategy" in updated:
            mitmproxy_internals.sync(self.runtime)  # connect_answer.ServerTlsFirst: lazy only
        if not updated & options.READ_BY_POLICY and self.policy is not None:
            return
        opts = ctx.options
        refuse_secret_options_in_web(opts)
        self.reloader.watch("")
        self._configure_kerberos()
        if opts.ntlm_multiuser:
            self._configure_multiuser()
            return
        if opts.ntlm_winbind:
            self._configure_winbind()
            return
        if not opts.ntlm_username:
            if opts.ntlm_password_keyring:
                raise exceptions.OptionsError(
                    "mitmproxy-ntlm: ntlm_password_keyring reads the password of ntlm_username: "
                    "set ntlm_username (DOMAIN\\user) as well")
            creds = self._kerberos_identity()
            if creds is None:
                self.logins = None
                self._switch_off()
                return
            self.logins = None
            self._install(creds=creds, guard=new_guard(opts))
            log.info("[ntlm] Kerberos only, as %s, to the parent proxy", creds.principal)
            return
        try:
            creds = self._credentials_from_options()
        except CredentialError as e:
            raise exceptions.OptionsError(f"mitmproxy-ntlm: {e}") from None
        if opts.ntlm_password:
            log.warning("[ntlm] ntlm_password is set in the options: other local users can see "
                        "it in the process list; prefer ntlm_password_file or ntlm_pass_nt")
        self.logins = None
        self._install(creds=creds, guard=new_guard(opts))
        self.reloader.watch(opts.ntlm_password_file)
        if opts.ntlm_password_keyring:
            log.info("[ntlm] the password of %s was read from the OS keyring (read again on "
                     "SIGHUP)", creds.principal)
        log.info("[ntlm] %s as %s to the parent proxy (workstation %s)",
                 self._dialect().label, creds.principal, creds.workstation)

    def _credentials_from_options(self) -> Credentials:
        """The single-user identity, its secret read now (CredentialError when unusable)."""
        opts = ctx.options
        return build_credentials(
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
                keyring_entry=principal_of(opts.ntlm_username, opts.ntlm_domain)
                if opts.ntlm_password_keyring else "",
            ),
            keep_password=self._tickets_from_passwords(),
        )

    def reload_secrets(self, reason: str, by_user: bool) -> None:
        """Read the secret again (SecretReloader). New credentials, or a SIGHUP, lift the
        lockout guard: the user fixed the password or asks for another try."""
        policy = self.policy
        if policy is None:
            return
        if policy.creds is None or policy.creds.winbind or not ctx.options.ntlm_username:
            # multi-user, winbind, Kerberos only: no secret of ours to read again
            if by_user:
                self.reset()
            return
        try:
            creds = self._credentials_from_options()
        except CredentialError as e:
            log.warning("[ntlm] %s: %s; the previous credentials stay in use", reason, e)
            return
        if creds == policy.creds and not by_user:
            return  # written again unchanged (or touched): the guard stays as it is
        changed = creds != policy.creds
        policy.creds = creds
        policy.guard.reset()
        policy.forget_rejections()
        log.info("[ntlm] %s: %s; the lockout guard is reset, credentials for %s will be sent",
                 reason, "new credentials read" if changed else "credentials read again",
                 creds.principal)

    def apply_config_file(self) -> set[str]:
        """Apply ntlm_config's options (OptionsError for a bad file or value, nothing changed
        then); returns the names whose value changed."""
        opts = ctx.options
        if not opts.ntlm_config:
            self._config_names = set()
            return set()
        update, names = config_file.changes(opts, opts.ntlm_config, opts.ntlm_config_keep,
                                            self._config_names)
        if update:
            try:
                opts.update(**update)
            except exceptions.OptionsError as e:
                cause = str(e).removeprefix("mitmproxy-ntlm: ")
                raise exceptions.OptionsError(f"config file {opts.ntlm_config}: {cause}") from None
        self._config_names = names
        return set(update)

    def reload_on_hangup(self) -> None:
        """SIGHUP: the config file, then the secret (lifting the lockout guard), then the PAC."""
        opts = ctx.options
        changed: set[str] = set()
        if opts.ntlm_config:
            try:
                changed = self.apply_config_file()
            except exceptions.OptionsError as e:
                log.warning("[ntlm] SIGHUP: %s; the running options stay as they were", e)
            else:
                log.info("[ntlm] SIGHUP: %s read again: %s", opts.ntlm_config,
                         f"changed {', '.join(sorted(changed))}" if changed else "no change")
        self.reload_secrets("SIGHUP", True)
        if opts.ntlm_pac and "ntlm_pac" not in changed:
            try:
                opts.update(ntlm_pac=opts.ntlm_pac)  # the router fetches it again
            except exceptions.OptionsError as e:
                log.warning("[ntlm] SIGHUP: the PAC file was not reloaded: %s", e)

    def _configure_multiuser(self) -> None:
        opts = ctx.options
        given = [name for name in ("ntlm_username", *options.SECRET_SOURCES, "ntlm_winbind")
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
        self._install(creds=None,
                      guard=new_guard(opts, cooldown=float(opts.ntlm_lockout_cooldown)))
        assert self.policy is not None
        self.logins = ClientLogins(self.policy, opts.ntlm_domain, opts.ntlm_workstation.upper(),
                                   keep_passwords=self._tickets_from_passwords())
        log.info("[ntlm] multi-user mode: clients authenticate with Basic, %s towards the parent "
                 "(default domain %s)", self._dialect().label, opts.ntlm_domain or "none")

    def _configure_winbind(self) -> None:
        """NTLM by winbind's ntlm_auth with the cached credentials: no secret option may be
        set (it would not be used), and ntlm_auth must be there."""
        opts = ctx.options
        given = [name for name in options.SECRET_SOURCES if getattr(opts, name, "")]
        if given:
            raise exceptions.OptionsError(
                f"mitmproxy-ntlm: ntlm_winbind takes the password from winbind's cache; remove "
                f"{', '.join(given)}")
        if winbind.program() is None:
            raise exceptions.OptionsError(
                f"mitmproxy-ntlm: ntlm_winbind needs Samba's {winbind.PROGRAM}: "
                f"{winbind.INSTALL_HINT}")
        creds = winbind.winbind_identity(opts.ntlm_username, opts.ntlm_domain,
                                         opts.ntlm_workstation)
        self.logins = None
        self._install(creds=creds, guard=new_guard(opts))
        log.info("[ntlm] NTLM by winbind (cached credentials) as %s to the parent proxy",
                 creds.principal)

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
        if opts.ntlm_kerberos_keytab:
            try:  # read by the Kerberos library: a FIFO there would hang it
                stat_regular_file(opts.ntlm_kerberos_keytab, "ntlm_kerberos_keytab")
            except FileRefused as e:
                raise exceptions.OptionsError(f"mitmproxy-ntlm: {e}") from None
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

    def _install(self, creds: Credentials | None, guard: Guard) -> None:
        """Validate the shared options and route parent connections through the NTLM layer."""
        opts = ctx.options
        try:
            mitmproxy_internals.check_version()
        except mitmproxy_internals.UnsupportedMitmproxy as e:
            raise exceptions.OptionsError(str(e)) from None
        dialect = self._dialect()
        if dialect is not Dialect.NTLMV2:
            log.warning("[ntlm] ntlm_dialect=%s is weak (crackable responses); use it only for a "
                        "parent that refuses NTLMv2", dialect.value)
        assert self.tickets is not None
        self.runtime.policy = UpstreamPolicy(
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
            recovery=_recovery_hint(),
        )
        if self._running:  # an options change lifts the guard; a (re)start must not wipe
            guard.reset()  # what other processes counted in ntlm_lockout_file
        self._configure_pool()

    def _configure_pool(self) -> None:
        """(Re)build the connection pool: a new policy or pool option drops pooled connections."""
        opts = ctx.options
        if self.policy is None or not opts.ntlm_pool or not opts.ntlm_pool_idle \
                or not opts.ntlm_pool_max:
            self.runtime.replace_pool(None)
        else:
            self.runtime.replace_pool(ParentPool(
                float(opts.ntlm_pool_idle), opts.ntlm_pool_max,
                per_key=opts.ntlm_pool_connections, wait_timeout=float(opts.ntlm_pool_wait),
                grace=opts.ntlm_pool_grace / 1000))
        mitmproxy_internals.sync(self.runtime)

    @property
    def policy(self) -> UpstreamPolicy | None:
        return self.runtime.policy

    def _switch_off(self) -> None:
        """No parent logon: mitmproxy's own parent layer again, the pool closed."""
        self.runtime.policy = None
        self.runtime.replace_pool(None)
        mitmproxy_internals.sync(self.runtime)

    def running(self) -> None:
        self._running = True
        self.reloader.start()
        _show_comment_column()
        if self.policy is None:
            log.warning("[ntlm] ntlm_username is not set: mitmproxy-ntlm is idle")
        elif not (_upstream_mode() or ctx.options.ntlm_parent or ctx.options.ntlm_pac):
            log.info("[ntlm] NTLM is used only towards a parent proxy: --mode upstream:URL, "
                     "or ntlm_parent or ntlm_pac in regular/socks5 mode")

    def done(self) -> None:
        if ctx.options.ntlm_report_file:  # mitmdump has no command line: the report at exit
            self.save_report(ctx.options.ntlm_report_file)
        self.reloader.stop()
        self._switch_off()
        if self.tickets is not None:
            self.tickets.forget()
        if self.policy is not None and self.policy.chooser is not None:
            self.policy.chooser.winbind_helpers.stop_all()  # of handshakes left unfinished

    def socks5_auth(self, data: Any) -> None:
        """SOCKS5 username/password (offered when proxyauth is set) become the identity."""
        if self.logins is None:
            return
        problem = self.logins.pin(data.client_conn, data.username, data.password)
        data.valid = problem is None and data.valid
        if problem:
            log.warning("[ntlm] SOCKS5 client refused: %s", problem)

    def idle_hooks(self) -> set[str]:
        """Hooks with nothing to do now (see script.AddonGroup). Never `requestheaders` or
        `http_connect`: they drop the clients' proxy credentials, idle addon or not."""
        idle = set() if self.logins is not None else {"client_disconnected"}
        if self.policy is None:
            idle |= {"response", "error"}
        return idle

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
        reason = shown(reason, PAGE_LIMIT)  # may quote the client's user name
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
        """Refuse known-bad credentials (reading the multi-user identity), then drop the
        client's proxy credentials: whatever the route, they never leave mitmproxy. Only an
        idle addon leaves them on a request relayed to a parent, as stock mitmproxy does."""
        policy = self.policy
        if policy is not None:  # a request inside a tunnel that failed: its own error
            answer_failed_tunnel(self.runtime, flow)
        if policy is not None and policy.may_refuse() and _to_parent(flow):
            self._check_client(flow)
        if policy is not None or not relayed_to_parent(flow, _upstream_mode()):
            drop_client_proxy_credentials(flow.request.headers)

    def http_connect(self, flow: http.HTTPFlow) -> None:
        if self.policy is not None and _to_parent(flow) and self._check_client(flow):
            bounded_set(self._connect_flows, flow.server_conn.id, flow, 1000)
        # mitmproxy never forwards the client's CONNECT, but the flow is shown and saved.
        drop_client_proxy_credentials(flow.request.headers)

    def _handshake_finished(self, trace: HandshakeTrace, client: Any, server: Any) -> None:
        """Called by the layer when a handshake ends: annotate the CONNECT, show the legs."""
        connect_flow = self._connect_flows.pop(trace.key, None) if trace.key else None
        view = ctx.master.addons.get("view")
        show_legs = bool(ctx.options.ntlm_show_legs and view is not None and trace.exchanges)
        if connect_flow is None:
            if show_legs:  # shown with the first flow on this connection, see `_annotate`
                bounded_set(self._pending_legs, trace.key, (trace, client, server), 256)
            return
        listed = view is not None and view.get_by_id(connect_flow.id) is not None
        # mitmproxy lists no CONNECT flows; a failed tunnel must not stay invisible, and legs
        # need the flow they belong to.
        listing = view is not None and not listed and (not trace.ok or show_legs)
        self._annotate(connect_flow)
        if not (listed or listing) and trace.shown_on == connect_flow.id:
            trace.shown_on = ""  # the first listed flow on this connection tells the story
        if not trace.ok:
            _show_parent_answer(connect_flow, trace)
        if show_legs:
            self._add_legs(trace, client, server, connect_flow)
        if listing:
            view.add([connect_flow])  # after its legs: mitmweb lists new flows last
        else:
            ctx.master.addons.trigger(UpdateHook([connect_flow]))

    def _add_legs(self, trace: HandshakeTrace, client: Any, server: Any,
                  flow: http.HTTPFlow) -> None:
        """List the legs just before `flow`, each naming it, and name them on `flow`."""
        view = ctx.master.addons.get("view")
        legs = leg_flows(trace, client, server, belongs_to=flow)
        if view is None or not legs:
            return
        view.add(legs)
        ids = [leg.id for leg in legs]
        flow.metadata["ntlm_legs"] = ids
        flow.comment = shown(f"{flow.comment}; handshake requests listed above it: "
                             f"{', '.join(i[:8] for i in ids)}", PAGE_LIMIT)
        if view.get_by_id(flow.id) is not None:
            # mitmweb's list shows new flows last; its reset lists all in the view's order.
            view.sig_view_refresh.send()

    # The story of each flow, for mitmweb / console / mitmdump.

    def _annotate(self, flow: http.HTTPFlow) -> None:
        policy = self.policy
        if policy is None or "ntlm" in flow.metadata:
            return
        origin = policy.trace(f"{flow.server_conn.id}/origin")
        if origin is not None and "ntlm_origin" not in flow.metadata:
            metadata, comment, _ = origin.annotation()
            flow.metadata["ntlm_origin"] = metadata
            flow.comment = flow.comment or shown(comment, PAGE_LIMIT)
            self._legs_for(flow, f"{flow.server_conn.id}/origin")
        trace = policy.trace(flow.server_conn.id)
        if trace is None or trace.result == "pending":
            return
        metadata, comment, ok = trace.annotation()
        flow.metadata["ntlm"] = metadata
        first = trace.shown_on in ("", flow.id)
        trace.shown_on = trace.shown_on or flow.id
        if not first and trace.result == "authenticated":
            comment += " (this connection was authenticated for an earlier request)"
        if not flow.comment:
            flow.comment = shown(comment, PAGE_LIMIT)  # names the user, host and URL
        if not flow.marked:  # the user's own mark stays
            flow.marked = ":warning:" if not ok else \
                MARKS.get(trace.result, "") if first or trace.result == "reused" else ""
        self._legs_for(flow, flow.server_conn.id)

    def _legs_for(self, flow: http.HTTPFlow, key: str) -> None:
        pending = self._pending_legs.pop(key, None)
        if pending is not None:
            self._add_legs(*pending, flow)

    def response(self, flow: http.HTTPFlow) -> None:
        self._annotate(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._annotate(flow)

    @staticmethod
    def _mark_failed(flow: http.HTTPFlow, reason: str) -> None:
        flow.metadata["ntlm"] = {"result": "blocked", "reason": reason}
        flow.comment = shown(reason, PAGE_LIMIT)
        flow.marked = ":warning:"

    # Commands.

    @command.command("ntlm.reset")
    def reset(self) -> None:
        """Re-enable credentials disabled by the lockout guard."""
        if self.policy is not None:
            self.policy.guard.reset()
            self.policy.forget_rejections()
            log.info("[ntlm] lockout guard reset: credentials will be sent again")

    # They return lines (Sequence[str]): the console shows them one per row, mitmweb's command
    # bar as a list of strings (one str with newlines would show there as escaped \n).

    @command.command("ntlm.decode")
    def decode(self, token: str) -> Sequence[str]:
        """Decode an NTLM, SPNEGO or Kerberos token (base64, optionally after NTLM or
        Negotiate); responses, keys and tickets are not shown."""
        return authview.decode_lines(token)

    @command.command("ntlm.report")
    def report(self) -> Sequence[str]:
        """Diagnostic report for the IT department: versions, options (no secrets), the
        parents' schemes, the last handshakes with the decoded challenge and clock skew."""
        traces = self.policy.kept_traces() if self.policy is not None else []
        return build_report(ctx.options, list(self.status()), traces)

    @command.command("ntlm.report.save")
    def save_report(self, path: types.Path) -> str:
        """Write the diagnostic report (ntlm.report) to a file."""
        try:
            target = write_report(path, list(self.report()))
        except OSError as e:
            message = f"mitmproxy-ntlm: report not written to {path}: {e.strerror or e}"
            log.warning("[ntlm] %s", message)
            return message
        log.info("[ntlm] diagnostic report written to %s", target)
        return f"report written to {target}"

    @command.command("ntlm.status")
    def status(self) -> Sequence[str]:
        """Parents, users (no secrets), handshakes, rejections, lockouts, recent handshakes."""
        policy = self.policy
        if policy is None:
            return ["mitmproxy-ntlm: idle (set ntlm_username, or ntlm_multiuser)"]
        if policy.creds is not None:
            users = [policy.creds.principal]
            mode = f"single user ({policy.dialect.label})"
        else:
            users = sorted({c.principal for c in policy.identities.values()})
            mode = (f"multi-user, {len(policy.identities)} client connections "
                    f"({policy.dialect.label})")
        traces = policy.kept_traces()
        results: dict[str, int] = {}
        for t in traces:
            results[t.result] = results.get(t.result, 0) + 1
        lines = [
            f"parents: {', '.join(str(m) for m in ctx.options.mode)}",
            f"mode: {mode}",
            "handshakes: " + (", ".join(f"{n} {r}" for r, n in sorted(results.items()))
                              or "none")
            + f" (open connections' and the last {RECENT_TRACES})",
        ]
        pool = self.runtime.pool
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
        counts = self.runtime.direct_counts
        if self.runtime.direct is None:
            lines.append("direct tunnels: off (mitmproxy's layers carry every tunnel)")
        else:
            lines.append(f"direct tunnels (ignore_hosts, outside mitmproxy's layers): "
                         f"{counts.opened} opened, {counts.open_now} open now, "
                         f"{counts.failed} failed")
        lines += policy.logon_needs.status()
        for user in users:
            blocked = " BLOCKED (lockout guard)" if policy.guard.blocked(user) else ""
            lines.append(f"user {shown(user)}: {policy.guard.failures(user)} consecutive "
                         f"rejections of {policy.guard.limit}{blocked}")
        assert policy.chooser is not None
        lines.append(f"scheme: {policy.chooser.mode.value}")
        if self.tickets is not None:
            lines += [f"Kerberos ticket {t['principal']} from {t['source']}, valid until "
                      f"{t['expires']}, renewed {t['renewals']} times"
                      for t in self.tickets.status()]
        lines += [shown(f"  {t.client} -> {t.parent} {t.kind}: {t.result}"
                        + (f" [{t.dialect}]" if t.dialect else ""), PAGE_LIMIT)
                  for t in traces[-5:]]
        return lines


def _show_parent_answer(flow: http.HTTPFlow, trace: HandshakeTrace) -> None:
    """A CONNECT already answered 200 (mitmproxy answers before the parent handshake) whose
    tunnel failed shows what the parent answered, or the error; the comment says what the
    client was told. A CONNECT answered after the handshake already shows the real answer."""
    told = flow.response
    if told is None or not 200 <= told.status_code < 300:
        return
    answer = parent_answer(trace)
    if answer is None or 200 <= answer.status_code < 300:  # no answer, or failed after a 200
        error = trace.result.removeprefix("failed: ")
        answer = http.Response.make(trace.error_status or 502, error + "\n",
                                    {"Content-Type": "text/plain; charset=utf-8"})
    flow.response = answer
    flow.comment = shown(f"{flow.comment}; the client had been told {told.status_code} "
                         f"{told.reason or 'Connection established'} before the handshake, "
                         f"then its tunnel was closed", PAGE_LIMIT)


def _show_comment_column() -> None:
    """mitmweb: the flow list gets the comment column (the handshake's story) unless the user
    chose the columns."""
    opts = ctx.options
    if "web_columns" in opts and not opts.has_changed("web_columns") \
            and "comment" not in opts.web_columns:
        opts.update(web_columns=[*opts.web_columns, "comment"])


def _recovery_hint() -> str:
    """What ends a lockout-guard stop in this tool, for the 502 page and the log."""
    ways = []
    if ctx.options.ntlm_password_file:
        ways.append(f"correct {ctx.options.ntlm_password_file} (read again within seconds)")
    shared = ctx.options.ntlm_lockout_file  # a reset in any process using it lifts the guard
    if SIGHUP is not None:
        ways.append(f"send mitmproxy SIGHUP (kill -HUP {os.getpid()}"
                    + (f", or any process using {shared})" if shared else ")"))
    if type(ctx.master).__name__ in ("WebMaster", "ConsoleMaster"):  # they have a command line
        ways.append("run the command ntlm.reset")
    ways.append(f"stop every mitmproxy process using {shared}, delete it (and its -wal and -shm "
                f"files) and start them again" if shared else "restart mitmproxy")
    return ", ".join(ways[:-1]) + " or " + ways[-1]


def _to_parent(flow: http.HTTPFlow) -> bool:
    """The flow goes through a parent: upstream mode, or routed by ParentRouter (via set)."""
    return flow.server_conn.via is not None or _upstream_mode()


def _upstream_mode() -> bool:
    modes: Any = ctx.options.mode
    return any(str(m).startswith("upstream:") for m in modes)
