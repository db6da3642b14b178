"""The storage API provider: the object whose methods serve the storage verbs.

Verb ``Namespace.verbName`` is served by the method ``namespace_verb_name``
(``Volume.create`` -> ``volume_create``), with the schema's params
snake-cased as keyword arguments, already validated by the schema.
Results are plain values; failures raise storage's errors (storage.errors),
which name their schema error; task statuses carry the error's name in
``code``.  The rpc layer maps names to codes.

:class:`StorageAPI` is one object made of verb groups that share one state
(:class:`storage.core.StorageCore`: domains, prepared images, locks, the
pool, the job table):

=============================  ==============================================
module                         verbs
=============================  ==============================================
:mod:`storage.pool_verbs`      ``StorageDomain.*``, ``StoragePool.*`` (and
                               :meth:`recover`)
:mod:`storage.volume_verbs`    ``Volume.*``, ``Image.prepare``,
                               ``Image.teardown``, ``Task.*``,
                               ``Host.getAllTasks*``
=============================  ==============================================

The image verbs of live storage migration (``Image.cloneStructure``,
``syncData``, ``delete``) are another provider, :class:`storage.image_ops.ImageOps`,
built on this one's narrow interface.

State that survives a daemon restart: the storage this host is connected
to (``<state_dir>/connections.json``), the domains it created
(``<state_dir>/domains/``), the pool it is connected to
(``<state_dir>/pool.json``; :meth:`recover` connects again), pool membership
and SPM tasks on the storage itself.
"""

from __future__ import annotations

from storage import pool_verbs, volume_verbs


class StorageAPI(
    pool_verbs.DomainVerbs,
    pool_verbs.PoolVerbs,
    volume_verbs.VolumeVerbs,
    volume_verbs.TaskVerbs,
):
    """Serves StorageDomain.*, StoragePool.*, Volume.*, Image.prepare/teardown,
    Task.* and Host.getAllTasks*.  Constructed with plain values
    (storage.core.StorageCore's keywords); the daemon's
    ``vdsm_lsm.app.storage_provider`` builds them from its config."""
