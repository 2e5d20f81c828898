"""The web console (issue 18): dashboard, worklist and review that feeds ``labels``, admin.

:func:`~screener.ops.console.server.start_console` runs it inside ``screener serve``;
:func:`~screener.ops.console.web.build_app` builds the ASGI application on its own (tests, benchmarks).
"""
