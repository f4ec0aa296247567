"""The service's routes, one group a module: ``inspect`` (one image and batches), ``explain``,
``heatmaps``, ``status`` (model card, health, readiness), ``docs`` and ``page``.

Each module has a ``router``; :func:`patchcore.apps.service.main.create_app` puts the ``/v1/*``
ones behind the token. Another group (e.g. a review page) is mounted the same way: pass its
router to ``create_app(..., routers=[...])``; it reaches the shared state through
:data:`patchcore.apps.service.dependencies.ServiceDep`.
"""
