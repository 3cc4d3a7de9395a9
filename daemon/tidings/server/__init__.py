"""The running daemon (trio): the hub (store + routing), one ``Connection`` per
WebSocket, the commands off the hot path, the listeners and graceful shutdown
(``daemon``), the HTTP API with metrics and the operator's page (``api``, ``admin``),
and the browser demo."""
