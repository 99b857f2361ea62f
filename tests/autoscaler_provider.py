"""A node provider for Ray's own autoscaler in the tests: Ray's ``fake_multinode`` provider (each
node a raylet on this machine), with what a cloud has and that provider lacks. Loaded by the
autoscaler as ``provider: {type: external, module: autoscaler_provider.CloudLikeProvider}``.

- Each node gets an address of its own, ``127.0.0.<n>`` (the loopback network is a /8): the node
  types the autoscaler reports are keyed by node IP, as on a cloud, and the IPs differ from the
  node ids.
- ``provider.fail_launches: {node_type: [category, description]}``: every launch of that type
  fails the way a cloud provider reports it (a NodeLaunchException, as Ray's AWS provider raises
  for ``InsufficientInstanceCapacity`` or a denied ``iam:PassRole``).
"""
from __future__ import annotations

import functools
import itertools

import ray._private.parameter
import ray._private.services
from ray.autoscaler._private.fake_multi_node import node_provider as fake
from ray.autoscaler.node_launch_exception import NodeLaunchException
from ray.autoscaler.tags import TAG_RAY_USER_NODE_TYPE

FIRST_HOST = 2  # 127.0.0.1 stays the head's


class CloudLikeProvider(fake.FakeMultiNodeProvider):
    def __init__(self, provider_config, cluster_name):
        super().__init__(provider_config, cluster_name)
        self._fail = provider_config.get("fail_launches") or {}
        self._hosts = itertools.count(FIRST_HOST)
        self._ips: dict[str, str] = {}

    def create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
        node_type = tags[TAG_RAY_USER_NODE_TYPE]
        if node_type in self._fail:
            category, description = self._fail[node_type]
            raise NodeLaunchException(category, description, None)
        return super().create_node_with_resources_and_labels(node_config, tags, count, resources, labels)

    def _create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
        ip = f"127.0.0.{next(self._hosts)}"
        original = ray._private.parameter.RayParams
        fake.ray._private.parameter.RayParams = functools.partial(original, node_ip_address=ip)
        try:
            super()._create_node_with_resources_and_labels(node_config, tags, count, resources, labels)
        finally:
            fake.ray._private.parameter.RayParams = original
        self._ips[f"fffffffffffffffffffffffffffffffffffffffffffffffffff{str(self._next_node_id).zfill(5)}"] = ip

    def _get_ip(self, node_id: str):
        if node_id == self._head_node_id:
            return ray._private.services.get_node_ip_address()
        return self._ips[node_id]
