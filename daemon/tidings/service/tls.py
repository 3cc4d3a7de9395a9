"""TLS for the main listener (wss://): the server SSL context and the stream wrapper.

``server_context(cfg)`` returns None when ``server.tls_cert``/``tls_key`` are unset, else
an ``ssl.SSLContext`` (TLS 1.2+, HTTP/1.1 ALPN) loaded from the PEM files.  It raises
``TlsConfigError`` whose message names the offending file and key: missing/unreadable
file, a certificate file without a certificate, a key file without a usable key, or a
key that does not match the certificate.  Called at start (a failure is a StartupError)
and on reload (a failure keeps the old context).

``wrap(stream, context)`` wraps one accepted TCP stream in ``trio.SSLStream``.  The TLS
handshake happens on the first read, i.e. inside the server's handshake timeout, so a
client that stalls or fails it costs only its own task.
"""

from __future__ import annotations

import ssl

__all__ = ["TlsConfigError", "server_context", "wrap"]


class TlsConfigError(Exception):
    """The certificate or key cannot be used; the message names the file."""


def _readable(key: str, path: str) -> None:
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise TlsConfigError(f"server.{key} {path}: {exc.strerror}") from None


def server_context(cfg) -> ssl.SSLContext | None:
    """Build the server context for ``cfg`` (a ServerConfig), or None without TLS."""
    if not cfg.tls_cert and not cfg.tls_key:
        return None
    _readable("tls_cert", cfg.tls_cert)
    _readable("tls_key", cfg.tls_key)
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        probe.load_verify_locations(cafile=cfg.tls_cert)
    except (ssl.SSLError, ValueError) as exc:
        raise TlsConfigError(f"server.tls_cert {cfg.tls_cert}: not a PEM certificate ({exc})") from None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(certfile=cfg.tls_cert, keyfile=cfg.tls_key)
    except ssl.SSLError as exc:
        text = str(exc)
        if "KEY_VALUES_MISMATCH" in text or "key values mismatch" in text:
            raise TlsConfigError(
                f"server.tls_key {cfg.tls_key} does not match the certificate in server.tls_cert {cfg.tls_cert}"
            ) from None
        raise TlsConfigError(
            f"server.tls_key {cfg.tls_key}: cannot load the private key for {cfg.tls_cert} ({exc.reason or exc})"
        ) from None
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def wrap(stream, context: ssl.SSLContext):
    """A server-side ``trio.SSLStream`` over ``stream`` (handshake on first I/O)."""
    import trio

    # https_compatible: a peer closing TCP without close_notify is an ordinary EOF.
    return trio.SSLStream(stream, context, server_side=True, https_compatible=True)
