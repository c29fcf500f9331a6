"""The replay client: sends generated or archived Engine traffic to a log server over HTTPS
(as Fluentd's out_http) or the forward protocol (as out_forward), and verifies what landed.

A client only: it imports nothing of the mwdlogd server. `mwdlogd replay` hands it what
the server config says (`cli.ServerDefaults`); on its own it takes everything from the
command line.
"""
