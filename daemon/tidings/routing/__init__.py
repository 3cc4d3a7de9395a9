"""Routing: who is connected (``sessions``), fan-out of stored messages to live
connections (``router``), the switch from replay to live delivery (``replay``), rooms
and presence watches (``rooms``, ``watches``).  Sans-IO: nothing in this package imports
trio; connections are duck-typed endpoints (``router.Endpoint``)."""
