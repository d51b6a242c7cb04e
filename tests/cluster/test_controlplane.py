"""The cluster harness is a real control plane: controllers act, garbage collection runs, CRDs serve, RBAC denies."""

import time

import pytest
from kubernetes import client
from kubernetes.client import ApiException

pytestmark = pytest.mark.cluster

WAIT_S = 90  # an upper bound for the controllers to act, not a performance claim


def eventually(what, fn, timeout=WAIT_S):
    """Poll fn() until it returns something truthy; fail naming what never happened and what was last seen."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(0.5)
    pytest.fail(f"{what} did not happen within {timeout}s (last seen: {last!r})")


def owned_by(items, owner_uid):
    return [o for o in items if any(r.uid == owner_uid for r in (o.metadata.owner_references or []))]


def deployment(name, replicas):
    labels = {"app": name}
    return client.V1Deployment(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1DeploymentSpec(
            replicas=replicas,
            selector=client.V1LabelSelector(match_labels=labels),
            template=client.V1PodTemplateSpec(
                metadata=client.V1ObjectMeta(labels=labels),
                # Never pulled: there is no kubelet, the pods only have to exist.
                spec=client.V1PodSpec(containers=[client.V1Container(name="c", image="registry.invalid/none:0")]),
            ),
        ),
    )


def test_deployment_gets_replicaset_and_pods_and_garbage_collection_removes_them(control_plane, namespace):
    control_plane.require_controllers()
    api = control_plane.api_client()
    apps, core = client.AppsV1Api(api), client.CoreV1Api(api)

    dep = apps.create_namespaced_deployment(namespace, deployment("web", replicas=2))
    rs = eventually("a ReplicaSet owned by the Deployment",
                    lambda: owned_by(apps.list_namespaced_replica_set(namespace).items, dep.metadata.uid))
    assert len(rs) == 1
    rs_uid = rs[0].metadata.uid
    pods = eventually("2 Pods owned by the ReplicaSet",
                      lambda: (p := owned_by(core.list_namespaced_pod(namespace).items, rs_uid)) and len(p) == 2 and p)
    assert all(p.status.phase == "Pending" for p in pods), "no kubelet or scheduler, so pods must stay Pending"

    apps.delete_namespaced_deployment("web", namespace, propagation_policy="Background")
    eventually("the ReplicaSet to be garbage-collected",
               lambda: not owned_by(apps.list_namespaced_replica_set(namespace).items, dep.metadata.uid))
    eventually("the Pods to be garbage-collected",
               lambda: not owned_by(core.list_namespaced_pod(namespace).items, rs_uid))


def crd(group, plural, kind):
    schema = client.V1JSONSchemaProps(
        type="object",
        properties={"spec": client.V1JSONSchemaProps(
            type="object", properties={"size": client.V1JSONSchemaProps(type="integer", minimum=1)})},
    )
    return client.V1CustomResourceDefinition(
        metadata=client.V1ObjectMeta(name=f"{plural}.{group}"),
        spec=client.V1CustomResourceDefinitionSpec(
            group=group,
            scope="Namespaced",
            names=client.V1CustomResourceDefinitionNames(plural=plural, singular=kind.lower(), kind=kind),
            versions=[client.V1CustomResourceDefinitionVersion(
                name="v1", served=True, storage=True,
                schema=client.V1CustomResourceValidation(open_apiv3_schema=schema))],
        ),
    )


GROUP, PLURAL = "harness.test.semipd.io", "widgets"


@pytest.fixture(scope="module")
def widget_crd(control_plane):
    """A namespaced CRD Widget (spec.size >= 1), Established, deleted after the module."""
    ext = client.ApiextensionsV1Api(control_plane.api_client())
    name = f"{PLURAL}.{GROUP}"
    ext.create_custom_resource_definition(crd(GROUP, PLURAL, "Widget"))

    def established():
        conds = ext.read_custom_resource_definition(name).status.conditions or []
        return any(c.type == "Established" and c.status == "True" for c in conds)

    try:
        eventually("the CRD to become Established", established)
        yield name
    finally:
        ext.delete_custom_resource_definition(name)


def create_widget(custom, namespace, name, size):
    body = {"apiVersion": f"{GROUP}/v1", "kind": "Widget", "metadata": {"name": name}, "spec": {"size": size}}
    return custom.create_namespaced_custom_object(GROUP, "v1", namespace, PLURAL, body)


def test_crd_becomes_established_and_serves_custom_objects(control_plane, namespace, widget_crd):
    custom = client.CustomObjectsApi(control_plane.api_client())
    # Serving can lag the Established condition by a moment; the create is what must eventually work.
    eventually("creating a Widget", lambda: _try(lambda: create_widget(custom, namespace, "w1", 3)))
    got = custom.get_namespaced_custom_object(GROUP, "v1", namespace, PLURAL, "w1")
    assert got["spec"] == {"size": 3}
    assert got["metadata"]["uid"]

    with pytest.raises(ApiException) as e:
        create_widget(custom, namespace, "w2", 0)
    assert e.value.status == 422, "the CRD's OpenAPI schema (minimum: 1) must be enforced"


def test_garbage_collection_follows_owner_references_to_custom_objects(control_plane, namespace, widget_crd):
    # The operator relies on exactly this: its children are owned by a custom resource.
    control_plane.require_controllers()
    api = control_plane.api_client()
    custom, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
    owner = eventually("creating a Widget", lambda: _try(lambda: create_widget(custom, namespace, "owner", 1)))
    ref = client.V1OwnerReference(api_version=f"{GROUP}/v1", kind="Widget", name="owner",
                                  uid=owner["metadata"]["uid"], controller=True, block_owner_deletion=True)
    core.create_namespaced_config_map(namespace, client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name="child", owner_references=[ref]), data={"k": "v"}))

    custom.delete_namespaced_custom_object(GROUP, "v1", namespace, PLURAL, "owner")
    eventually("the owned ConfigMap to be garbage-collected",
               lambda: not _try(lambda: core.read_namespaced_config_map("child", namespace)))


def _try(fn):
    try:
        return fn()
    except ApiException as e:
        if e.status == 404:
            return None
        raise


def test_service_account_without_permissions_is_forbidden_until_granted(control_plane, namespace):
    api = control_plane.api_client()
    core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    core.create_namespaced_service_account(namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="nobody")))
    token = core.create_namespaced_service_account_token(
        "nobody", namespace, client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(
            audiences=[], expiration_seconds=600))).status.token
    as_sa = client.CoreV1Api(control_plane.api_client(token=token))

    with pytest.raises(ApiException) as e:
        as_sa.list_namespaced_pod(namespace)
    assert e.value.status == 403, "authenticated (not 401) but not authorized"
    assert f"system:serviceaccount:{namespace}:nobody" in e.value.body

    # Granting exactly "list pods" must turn the 403 into a 200: the denial came from RBAC, not the token.
    rbac.create_namespaced_role(namespace, client.V1Role(
        metadata=client.V1ObjectMeta(name="pod-reader"),
        rules=[client.V1PolicyRule(api_groups=[""], resources=["pods"], verbs=["list"])]))
    rbac.create_namespaced_role_binding(namespace, client.V1RoleBinding(
        metadata=client.V1ObjectMeta(name="nobody-reads-pods"),
        role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name="pod-reader"),
        subjects=[client.RbacV1Subject(kind="ServiceAccount", name="nobody", namespace=namespace)]))
    eventually("the RoleBinding to allow listing pods",
               lambda: _allowed(lambda: as_sa.list_namespaced_pod(namespace)))
    with pytest.raises(ApiException) as e:
        as_sa.list_namespaced_secret(namespace)
    assert e.value.status == 403, "the grant covers pods only"


def _allowed(fn):
    try:
        fn()
        return True
    except ApiException as e:
        if e.status == 403:
            return False
        raise
