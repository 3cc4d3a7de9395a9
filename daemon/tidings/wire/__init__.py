"""The wire: client frames and server frames (``protocol``), the HTTP upgrade
(``handshake``) and per-connection rate limits (``limits``).  Sans-IO: nothing in this
package imports trio or touches a socket."""
