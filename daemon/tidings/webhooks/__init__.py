"""Webhooks: signed HTTP POSTs telling another service what happened (issue #13).

* :mod:`~tidings.webhooks.signing` - the ``Tidings-Signature`` header (sans-IO);
* :mod:`~tidings.webhooks.events` - the JSON body of each event and the retry schedule
  (sans-IO);
* :mod:`~tidings.webhooks.recorder` - the hub's side: users coming and going on this
  node, stored messages to check; written to the store (trio);
* :mod:`~tidings.webhooks.sender` - the outbox's reader: one sender per deployment POSTs
  every event at least once, in order per user, with retries (trio, httpx).

Events enter a durable outbox in the store (:mod:`tidings.store.base`, "Webhooks")
before anything is sent.  With ``webhooks.url = ""`` none of this runs and the hub does
no webhook work at all.  Operators: docs/deploy.md, "Webhooks".
"""
