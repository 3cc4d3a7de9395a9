"""Running as a service: systemd readiness, watchdog and socket activation
(``sdnotify``), SIGHUP reload (``reload``, ``lifecycle``), the identity provider's
JWK Set (``jwks``), TLS (``tls``) and ``server.workers`` processes sharing a port
(``workers``)."""
