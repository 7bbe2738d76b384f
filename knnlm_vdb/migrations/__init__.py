"""Versioned schema migrations of a Milvus database, applied in order by ``knnlm-vdb migrate``.

Each module ``mNNNN_<name>.py`` is the step to schema version NNNN (1, 2, ... without gaps).
Its docstring's first line describes it; it defines ``upgrade(client, ctx)``, where ``client`` is
a ``pymilvus.MilvusClient`` and ``ctx`` a ``knnlm_vdb.schema.MigrationContext``. A step must be
idempotent (running it on a database that already has the change does nothing), must keep
every row, and must route each change through ``ctx.act(description, fn, *args)`` so that
``--dry-run`` lists it without doing it. The runner records the version after each step.

Collections created by the current code already have the newest schema; a migration upgrades
what older releases created. Never edit a released migration: add the next one.
"""
