"""deploy/: every kustomization rendered offline and checked, and the image's Dockerfile.

Rendering uses ``kubectl kustomize`` (the kustomize built into kubectl; it needs no
cluster). Every rendered object is validated in strict mode (unknown fields fail)
against the Kubernetes JSON schemas of the newest release that the
kubernetes-validate package ships. The snapshot.storage.k8s.io kinds have no schema
in any package available here, so their fields are checked by hand against
external-snapshotter's v1 CRDs (required fields, enums, exactly one source).

Then what no schema can see: the plugin's flags exist in its own ``--help`` and
parse; the driver name, socket paths, kubelet paths and topology key agree with
``csi_frontend.plugin``; the sidecars run in distributed mode; every image is
pinned; RBAC bindings point at what exists; the Dockerfile's entrypoint is an
installed console script and it copies every package.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate import utils as kv_utils

from csi_frontend import validation
from csi_frontend.plugin import DEFAULT_DRIVER_NAME, TOPOLOGY_KEY, VERSION

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# Every kustomization the guides tell people to apply; more may exist.
EXPECTED_KUSTOMIZATIONS = {
    "kubernetes",
    "kubernetes/snapshotclass",
    "kubernetes/snapshot-controller-rbac",
    "overlays/microk8s",
    "examples/pvc-pod",
    "examples/snapshot-restore",
    "examples/clone",
    "examples/block",
    "examples/csi-ephemeral",
    "examples/generic-ephemeral",
    "examples/modify-volume",
}
# The sidecar releases the reference driver (csi-driver-host-path v1.18) deploys.
SIDECAR_IMAGES = {
    "node-driver-registrar": "registry.k8s.io/sig-storage/csi-node-driver-registrar:v2.17.0",
    "csi-provisioner": "registry.k8s.io/sig-storage/csi-provisioner:v6.3.0",
    "csi-snapshotter": "registry.k8s.io/sig-storage/csi-snapshotter:v8.6.0",
    "csi-resizer": "registry.k8s.io/sig-storage/csi-resizer:v2.2.1",
    "liveness-probe": "registry.k8s.io/sig-storage/livenessprobe:v2.19.0",
}
PLUGIN_CONTAINER = "fusedrive"
PLUGIN_IMAGE = "fusedrive-csi"
MICROK8S_KUBELET = "/var/snap/microk8s/common/var/lib/kubelet"
SNAPSHOT_GROUP = "snapshot.storage.k8s.io"
CLUSTER_SCOPED = {
    "Namespace",
    "CSIDriver",
    "StorageClass",
    "ClusterRole",
    "ClusterRoleBinding",
    "VolumeSnapshotClass",
    "VolumeAttributesClass",
}
POD_SPEC_KINDS = {"DaemonSet", "Deployment", "StatefulSet", "Pod"}


# -- rendering -------------------------------------------------------------------


def _kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        message = "kubectl (for `kubectl kustomize`) is not on PATH"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@functools.cache
def _render(rel: str) -> tuple[dict[str, Any], ...]:
    proc = subprocess.run(
        [_kubectl(), "kustomize", str(DEPLOY / rel)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if proc.returncode != 0:
        pytest.fail(f"kubectl kustomize deploy/{rel} failed:\n{proc.stderr}")
    return tuple(doc for doc in yaml.safe_load_all(proc.stdout) if doc)


def render(rel: str) -> list[dict[str, Any]]:
    """The objects of ``deploy/<rel>`` (copies: callers may change them)."""
    return copy.deepcopy(list(_render(rel)))


def kustomizations() -> list[str]:
    return sorted(str(p.parent.relative_to(DEPLOY)) for p in DEPLOY.rglob("kustomization.yaml"))


def all_objects() -> Iterator[tuple[str, dict[str, Any]]]:
    for rel in kustomizations():
        for obj in render(rel):
            yield rel, obj


def ident(obj: dict[str, Any]) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def only(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"] if obj["kind"] == "Pod" else obj["spec"]["template"]["spec"]


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        c
        for key in ("initContainers", "containers", "ephemeralContainers")
        for c in spec.get(key, [])
    ]


def container(spec: dict[str, Any], name: str) -> dict[str, Any]:
    found = [c for c in spec["containers"] if c["name"] == name]
    assert len(found) == 1, f"expected one container {name!r}"
    return found[0]


def flags(c: dict[str, Any]) -> dict[str, str | None]:
    """``--name[=value]`` arguments as a dict; a flag without a value maps to None."""
    out: dict[str, str | None] = {}
    for arg in c.get("args", []):
        assert arg.startswith("-"), f"{c['name']}: positional argument {arg!r}"
        name, eq, value = arg.partition("=")
        out[name.lstrip("-")] = value if eq else None
    return out


def env(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def mount_of(spec: dict[str, Any], c: dict[str, Any], volume: str) -> dict[str, Any]:
    found = [m for m in c.get("volumeMounts", []) if m["name"] == volume]
    assert len(found) == 1, f"{c['name']} does not mount {volume!r} once"
    return found[0]


def host_path(spec: dict[str, Any], volume: str) -> str:
    found = [v for v in spec["volumes"] if v["name"] == volume]
    assert len(found) == 1 and "hostPath" in found[0], f"no hostPath volume {volume!r}"
    return found[0]["hostPath"]["path"]


def walk(node: Any) -> Iterator[tuple[str, Any]]:
    """Every (key, value) pair of a nested document; list items come with key "[]"."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from walk(value)
    elif isinstance(node, list):
        for item in node:
            yield "[]", item
            yield from walk(item)


# The installable variants of the node DaemonSet.
NODE_VARIANTS = ("kubernetes", "overlays/microk8s")


def node_daemonset(rel: str) -> dict[str, Any]:
    return only(render(rel), "DaemonSet", "fusedrive-node")


def mounter_daemonset(rel: str) -> dict[str, Any]:
    return only(render(rel), "DaemonSet", "fusedrive-mounter")


# -- schema validation -------------------------------------------------------------

K8S_VERSION = kv_utils.latest_version()


def check_snapshot_object(obj: dict[str, Any]) -> None:
    """What external-snapshotter's v1 CRDs require; raises AssertionError otherwise."""
    assert obj["apiVersion"] == f"{SNAPSHOT_GROUP}/v1", f"{ident(obj)}: not v1"
    kind = obj["kind"]
    if kind == "VolumeSnapshotClass":
        allowed = {"apiVersion", "kind", "metadata", "driver", "deletionPolicy", "parameters"}
        assert set(obj) <= allowed, f"{ident(obj)}: unknown fields {set(obj) - allowed}"
        assert isinstance(obj.get("driver"), str) and obj["driver"], "driver is required"
        assert obj.get("deletionPolicy") in ("Delete", "Retain"), "deletionPolicy"
        params = obj.get("parameters", {})
        assert all(isinstance(v, str) for v in params.values()), "parameters are strings"
    elif kind == "VolumeSnapshot":
        assert set(obj) <= {"apiVersion", "kind", "metadata", "spec"}, f"{ident(obj)}: fields"
        spec = obj.get("spec")
        assert isinstance(spec, dict), "spec is required"
        assert set(spec) <= {"source", "volumeSnapshotClassName"}, "unknown spec fields"
        source = spec.get("source")
        assert isinstance(source, dict), "spec.source is required"
        keys = {"persistentVolumeClaimName", "volumeSnapshotContentName"}
        assert set(source) <= keys, "unknown source fields"
        assert len(set(source) & keys) == 1, "exactly one of the source fields"
        assert all(isinstance(v, str) and v for v in source.values())
        if "volumeSnapshotClassName" in spec:
            assert isinstance(spec["volumeSnapshotClassName"], str)
            assert spec["volumeSnapshotClassName"], "empty class name is not allowed"
    else:
        raise AssertionError(f"{ident(obj)}: no check for {kind}")
    assert isinstance(obj.get("metadata", {}).get("name"), str), "metadata.name"


def validate(obj: dict[str, Any]) -> None:
    if obj["apiVersion"].split("/")[0] == SNAPSHOT_GROUP:
        check_snapshot_object(obj)
        return
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = "/".join(str(p) for p in exc.path)
        raise AssertionError(f"{ident(obj)} at {where}: {exc.message}") from None
    except kubernetes_validate.SchemaNotFoundError as exc:
        raise AssertionError(exc.message) from None


def test_schemas_are_a_current_release() -> None:
    major, minor = (int(x) for x in K8S_VERSION.split(".")[:2])
    assert (major, minor) >= (1, 37)


def test_every_kustomization_the_guides_name_exists() -> None:
    assert set(kustomizations()) >= EXPECTED_KUSTOMIZATIONS


def test_every_manifest_file_is_in_a_kustomization() -> None:
    """No YAML under deploy/ escapes rendering (and so validation)."""
    listed: set[Path] = set()
    for rel in kustomizations():
        k = yaml.safe_load((DEPLOY / rel / "kustomization.yaml").read_text())
        for res in k.get("resources", []):
            path = (DEPLOY / rel / res).resolve()
            assert path.exists(), f"deploy/{rel}: resource {res} does not exist"
            if path.is_file():
                listed.add(path)
    manifests = {p.resolve() for p in DEPLOY.rglob("*.yaml") if p.name != "kustomization.yaml"}
    assert manifests, "no manifests found"
    assert manifests <= listed, f"not in any kustomization: {sorted(manifests - listed)}"


@pytest.mark.parametrize("rel", kustomizations())
def test_renders_and_validates(rel: str) -> None:
    objs = render(rel)
    assert objs, f"deploy/{rel} renders nothing"
    for obj in objs:
        validate(obj)


def test_strict_validation_catches_a_misspelt_field() -> None:
    ds = node_daemonset("kubernetes")
    validate(ds)
    pod_spec(ds)["containers"][0]["imagePullPolcy"] = "Always"
    with pytest.raises(AssertionError, match="imagePullPolcy"):
        validate(ds)


def test_snapshot_checks_catch_bad_objects() -> None:
    vsc = only(render("kubernetes/snapshotclass"), "VolumeSnapshotClass")
    vs = only(render("examples/snapshot-restore"), "VolumeSnapshot")
    check_snapshot_object(vsc)
    check_snapshot_object(vs)
    bad_policy = {**vsc, "deletionPolicy": "Keep"}
    no_driver = {k: v for k, v in vsc.items() if k != "driver"}
    two_sources = copy.deepcopy(vs)
    two_sources["spec"]["source"]["volumeSnapshotContentName"] = "x"
    no_source = copy.deepcopy(vs)
    del no_source["spec"]["source"]
    for bad in (bad_policy, no_driver, two_sources, no_source):
        with pytest.raises(AssertionError):
            check_snapshot_object(bad)


def test_scope_and_namespace() -> None:
    for rel, obj in all_objects():
        ns = obj["metadata"].get("namespace")
        if obj["kind"] in CLUSTER_SCOPED:
            assert ns is None, f"deploy/{rel}: cluster-scoped {ident(obj)} has namespace {ns}"
        elif rel in ("kubernetes", "overlays/microk8s"):
            assert ns == "fusedrive", f"deploy/{rel}: {ident(obj)} is in {ns!r}"


# -- the plugin container ------------------------------------------------------------


def plugin_help() -> str:
    script = Path(sys.executable).with_name("fusedrive-csi")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "csi_frontend.cli"]
    proc = subprocess.run(
        [*cmd, "serve", "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.parametrize("rel", NODE_VARIANTS)
def test_plugin_flags_exist_in_its_help_and_parse(rel: str) -> None:
    spec = pod_spec(node_daemonset(rel))
    plugin = container(spec, PLUGIN_CONTAINER)
    known = set(re.findall(r"(?<![\w-])--([a-z][a-z0-9-]*)", plugin_help()))
    assert {"endpoint", "node-id", "store"} <= known, "could not read the plugin's --help"
    for name in flags(plugin):
        assert name in known, f"deploy/{rel}: the plugin has no --{name}"

    # Kubernetes expands $(VAR) from the container's env; values from the downward
    # API are stand-ins here. Then the plugin's own parser reads the arguments
    # (with --help last, so it stops after parsing them instead of serving).
    values = {k: v if isinstance(v, str) else "node-1" for k, v in env(plugin).items()}
    args = []
    for arg in plugin["args"]:
        for var in re.findall(r"\$\((\w+)\)", arg):
            assert var in values, f"deploy/{rel}: {arg!r} uses $({var}), not in env"
            arg = arg.replace(f"$({var})", values[var])
        args.append(arg)
    script = Path(sys.executable).with_name("fusedrive-csi")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "csi_frontend.cli"]
    proc = subprocess.run(
        [*cmd, *args, "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, f"the plugin rejects {args}: {proc.stderr}"


def test_plugin_image_is_the_project_version() -> None:
    version = PYPROJECT["project"]["version"]
    assert version == VERSION
    for rel in NODE_VARIANTS:
        image = container(pod_spec(node_daemonset(rel)), PLUGIN_CONTAINER)["image"]
        assert image == f"{PLUGIN_IMAGE}:{version}", f"deploy/{rel}: plugin image {image}"


@pytest.mark.parametrize("rel", NODE_VARIANTS)
def test_paths_and_names_agree_with_the_plugin(rel: str) -> None:
    spec = pod_spec(node_daemonset(rel))
    plugin = container(spec, PLUGIN_CONTAINER)
    pflags = flags(plugin)
    assert pflags.get("driver-name", DEFAULT_DRIVER_NAME) == DEFAULT_DRIVER_NAME

    # Every mount names a volume of the pod.
    names = {v["name"] for v in spec["volumes"]}
    for c in containers(spec):
        for m in c.get("volumeMounts", []):
            assert m["name"] in names, f"{c['name']} mounts unknown volume {m['name']}"

    # kubelet's root: the plugin sees it at the very path kubelet uses, and mounts
    # it (and its own staging area) so that its mounts propagate to the host.
    kubelet = host_path(spec, "kubelet-dir")
    assert kubelet == (MICROK8S_KUBELET if "microk8s" in rel else "/var/lib/kubelet")
    km = mount_of(spec, plugin, "kubelet-dir")
    assert km["mountPath"] == kubelet
    # ... and accepts staging and target paths below it only.
    assert pflags.get("allowed-path-prefix") == kubelet
    assert km.get("mountPropagation") == "Bidirectional"
    assert mount_of(spec, plugin, "state-dir").get("mountPropagation") == "Bidirectional"
    assert mount_of(spec, plugin, "dev-dir")["mountPath"] == "/dev"
    assert host_path(spec, "dev-dir") == "/dev"
    assert plugin["securityContext"]["privileged"] is True
    assert host_path(spec, "registration-dir") == f"{kubelet}/plugins_registry"
    registrar = container(spec, "node-driver-registrar")
    assert mount_of(spec, registrar, "registration-dir")["mountPath"] == "/registration"

    # The socket: the plugin listens where CSI_ENDPOINT says, inside socket-dir,
    # which is kubelet's plugins/<driver name>; every sidecar dials the same file.
    endpoint = pflags["endpoint"]
    if endpoint == "$(CSI_ENDPOINT)":
        endpoint = env(plugin)["CSI_ENDPOINT"]
    assert endpoint is not None and endpoint.startswith("unix://")
    sock = endpoint.removeprefix("unix://")
    sock_dir, sock_name = os.path.split(sock)
    assert mount_of(spec, plugin, "socket-dir")["mountPath"] == sock_dir
    node_dir = host_path(spec, "socket-dir")
    assert node_dir == f"{kubelet}/plugins/{DEFAULT_DRIVER_NAME}"
    assert flags(registrar)["kubelet-registration-path"] == f"{node_dir}/{sock_name}"
    dialers = 0
    for c in spec["containers"]:
        address = flags(c).get("csi-address") if c is not plugin else None
        if address is not None:
            dialers += 1
            inside = mount_of(spec, c, "socket-dir")["mountPath"]
            assert address == f"{inside}/{sock_name}", f"{c['name']} dials {address}"
    assert dialers == len(SIDECAR_IMAGES)

    # The store, the node state and the mount records are on the node's disk.
    penv = env(plugin)
    store = mount_of(spec, plugin, "store-dir")["mountPath"]
    assert pflags["store"] == store == penv["FUSEDRIVE_STORE"] == host_path(spec, "store-dir")
    state = mount_of(spec, plugin, "state-dir")["mountPath"]
    assert pflags["state-dir"] == state == host_path(spec, "state-dir")
    runtime = mount_of(spec, plugin, "runtime-dir")["mountPath"]
    assert penv["FUSEDRIVE_RUNTIME_DIR"] == runtime == host_path(spec, "runtime-dir")


def test_driver_name_agrees_everywhere() -> None:
    seen = 0
    for rel, obj in all_objects():
        kind = obj["kind"]
        if kind == "CSIDriver":
            names = [obj["metadata"]["name"]]
        elif kind == "StorageClass":
            names = [obj["provisioner"]]
        elif kind == "VolumeSnapshotClass":
            names = [obj["driver"]]
        elif kind == "VolumeAttributesClass":
            names = [obj["driverName"]]
        elif kind in POD_SPEC_KINDS:
            names = [v["csi"]["driver"] for v in pod_spec(obj).get("volumes", []) if "csi" in v]
        else:
            continue
        for name in names:
            seen += 1
            assert name == DEFAULT_DRIVER_NAME, f"deploy/{rel}: {ident(obj)} names {name}"
    assert seen >= 5


def test_topology_key_agrees_with_the_plugin() -> None:
    """Wherever a manifest names a fusedrive topology label, it is the plugin's key."""
    used = []
    for rel, obj in all_objects():
        for key, value in walk(obj):
            candidates: list[str] = []
            if key in ("topologyKey", "key") and isinstance(value, str):
                candidates = [value]
            elif key in ("nodeSelector", "matchLabels") and isinstance(value, dict):
                candidates = list(value)
            for label in candidates:
                if label.startswith("topology.fusedrive.io"):
                    assert label == TOPOLOGY_KEY, f"deploy/{rel}: {ident(obj)} uses {label}"
                    used.append(rel)
    assert "examples/snapshot-restore" in used and "examples/clone" in used


# -- distributed mode, probes, images --------------------------------------------------


def _field_ref(value: Any) -> str | None:
    return value.get("fieldRef", {}).get("fieldPath") if isinstance(value, dict) else None


def test_sidecars_run_in_distributed_mode() -> None:
    spec = pod_spec(node_daemonset("kubernetes"))
    prov = container(spec, "csi-provisioner")
    pf = flags(prov)
    assert pf["node-deployment"] == "true"
    assert "enable-capacity" in pf
    assert pf["capacity-ownerref-level"] == "0"
    assert pf["strict-topology"] == "true"
    assert pf["immediate-topology"] == "false"
    assert pf["feature-gates"] == "Topology=true"
    penv = env(prov)
    assert _field_ref(penv["NODE_NAME"]) == "spec.nodeName"
    assert _field_ref(penv["NAMESPACE"]) == "metadata.namespace"
    assert _field_ref(penv["POD_NAME"]) == "metadata.name"

    snap = container(spec, "csi-snapshotter")
    assert "node-deployment" in flags(snap)
    assert _field_ref(env(snap)["NODE_NAME"]) == "spec.nodeName"
    assert _field_ref(env(container(spec, PLUGIN_CONTAINER))["NODE_NAME"]) == "spec.nodeName"

    # One instance per node: leader election would leave all but one node idle.
    for c in spec["containers"]:
        assert flags(c).get("leader-election", "false") == "false", c["name"]


def test_probes_are_wired() -> None:
    spec = pod_spec(node_daemonset("kubernetes"))
    plugin = container(spec, PLUGIN_CONTAINER)
    lp = flags(container(spec, "liveness-probe"))
    ports = {p["name"]: p["containerPort"] for p in plugin["ports"]}
    probe = plugin["livenessProbe"]
    port = probe["httpGet"]["port"]
    assert probe["httpGet"]["path"] == "/healthz"
    assert ports.get(port, port) == int(lp["health-port"] or 0)
    probe_timeout = int((lp["probe-timeout"] or "1s").removesuffix("s"))
    assert probe_timeout < probe["timeoutSeconds"]

    registrar = container(spec, "node-driver-registrar")
    rports = {p["name"]: p["containerPort"] for p in registrar["ports"]}
    rprobe = registrar["livenessProbe"]["httpGet"]
    http = flags(registrar)["http-endpoint"] or ""
    assert rports.get(rprobe["port"], rprobe["port"]) == int(http.rpartition(":")[2])

    for c in spec["containers"]:
        assert c.get("resources", {}).get("requests"), f"{c['name']} has no requests"
        assert c["resources"].get("limits", {}).get("memory"), f"{c['name']}: no memory limit"


def test_sidecar_images_are_the_reference_releases() -> None:
    for rel in NODE_VARIANTS:
        spec = pod_spec(node_daemonset(rel))
        got = {c["name"]: c["image"] for c in spec["containers"] if c["name"] != PLUGIN_CONTAINER}
        assert got == SIDECAR_IMAGES, f"deploy/{rel}"


def _tag(image: str) -> str | None:
    name = image.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    return last.partition(":")[2] or None


def test_every_image_is_pinned_to_a_version() -> None:
    seen = 0
    for rel, obj in all_objects():
        if obj["kind"] not in POD_SPEC_KINDS:
            continue
        for c in containers(pod_spec(obj)):
            seen += 1
            tag = _tag(c["image"])
            assert tag and tag != "latest", f"deploy/{rel}: {c['name']} image {c['image']}"
            assert re.fullmatch(r"v?\d+(\.\d+)+([-.][\w.]+)?", tag), f"{c['image']}: tag"
    assert seen >= 12
    for bad in ("busybox", "busybox:latest", "registry:5000/busybox"):
        assert not _tag(bad) or _tag(bad) == "latest"


# -- the API objects ---------------------------------------------------------------------


def test_csidriver() -> None:
    spec = only(render("kubernetes"), "CSIDriver")["spec"]
    assert spec["attachRequired"] is False
    assert spec["podInfoOnMount"] is True
    assert spec["storageCapacity"] is True
    assert spec["fsGroupPolicy"] == "File"
    assert sorted(spec["volumeLifecycleModes"]) == ["Ephemeral", "Persistent"]


def test_classes_and_their_parameters_are_accepted_by_the_plugin() -> None:
    sc = only(render("kubernetes"), "StorageClass")
    assert sc["volumeBindingMode"] == "WaitForFirstConsumer"
    assert sc["allowVolumeExpansion"] is True
    assert sc["reclaimPolicy"] == "Delete"
    validation.parameters(sc.get("parameters", {}), validation.KNOWN_PARAMETERS)
    vsc = only(render("kubernetes/snapshotclass"), "VolumeSnapshotClass")
    assert vsc["deletionPolicy"] == "Delete"
    vac = only(render("examples/modify-volume"), "VolumeAttributesClass")
    assert vac["parameters"], "the example class sets nothing"
    validation.parameters(vac["parameters"], validation.MUTABLE_PARAMETERS)

    # The inline volume's attributes are the ephemeral volume_context: a size the
    # node parses, and otherwise only StorageClass parameters.
    from fusedrive.units import parse_size

    pod = only(render("examples/csi-ephemeral"), "Pod")
    (vol,) = [v for v in pod_spec(pod)["volumes"] if "csi" in v]
    attrs = dict(vol["csi"].get("volumeAttributes", {}))
    assert parse_size(attrs.pop("size")) > 0
    assert validation.parameters(attrs, validation.KNOWN_PARAMETERS) == attrs


def test_examples_show_what_the_guide_promises() -> None:
    pod = only(render("examples/block"), "Pod")
    assert pod_spec(pod)["containers"][0]["volumeDevices"]
    assert only(render("examples/block"), "PersistentVolumeClaim")["spec"]["volumeMode"] == "Block"
    restore = only(render("examples/snapshot-restore"), "PersistentVolumeClaim")
    snap = only(render("examples/snapshot-restore"), "VolumeSnapshot")
    assert restore["spec"]["dataSource"] == {
        "apiGroup": SNAPSHOT_GROUP,
        "kind": "VolumeSnapshot",
        "name": snap["metadata"]["name"],
    }
    source = only(render("examples/pvc-pod"), "PersistentVolumeClaim")["metadata"]["name"]
    assert snap["spec"]["source"]["persistentVolumeClaimName"] == source
    clone = only(render("examples/clone"), "PersistentVolumeClaim")
    assert clone["spec"]["dataSource"] == {"kind": "PersistentVolumeClaim", "name": source}
    generic = only(render("examples/generic-ephemeral"), "Pod")
    (vol,) = pod_spec(generic)["volumes"]
    assert vol["ephemeral"]["volumeClaimTemplate"]["spec"]["storageClassName"] == "fusedrive"
    for rel in ("pvc-pod", "snapshot-restore", "clone", "block", "modify-volume"):
        for pvc in render(f"examples/{rel}"):
            if pvc["kind"] == "PersistentVolumeClaim":
                assert pvc["spec"]["storageClassName"] == "fusedrive", rel


def test_rbac_is_bound_and_least_privilege() -> None:
    objs = render("kubernetes")
    ds = only(objs, "DaemonSet", "fusedrive-node")
    sa = only(objs, "ServiceAccount")
    assert pod_spec(ds)["serviceAccountName"] == sa["metadata"]["name"]
    roles = {(o["kind"], o["metadata"]["name"]): o for o in objs if o["kind"].endswith("Role")}
    bindings = [o for o in objs if o["kind"].endswith("RoleBinding")]
    assert len(bindings) == len(roles) == 4
    for b in bindings:
        ref = b["roleRef"]
        assert (ref["kind"], ref["name"]) in roles, f"{ident(b)} points at nothing"
        for s in b["subjects"]:
            assert (s["kind"], s["name"], s["namespace"]) == (
                "ServiceAccount",
                sa["metadata"]["name"],
                sa["metadata"]["namespace"],
            )
    grants: set[tuple[str, str, str]] = set()
    for role in roles.values():
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[field], f"{ident(role)}: wildcard {field}"
            assert "secrets" not in rule["resources"], f"{ident(role)} reads secrets"
            for res in rule["resources"]:
                for verb in rule["verbs"]:
                    scope = "ns" if role["kind"] == "Role" else "cluster"
                    grants.add((scope, res, verb))
    needed = {
        ("cluster", "persistentvolumes", "create"),
        ("cluster", "persistentvolumes", "delete"),
        ("cluster", "nodes", "get"),
        ("cluster", "csinodes", "get"),
        ("ns", "csistoragecapacities", "create"),
        ("ns", "pods", "get"),
        ("cluster", "volumesnapshotcontents/status", "update"),
        ("cluster", "persistentvolumeclaims/status", "patch"),
    }
    assert needed <= grants, f"missing: {needed - grants}"
    assert ("ns", "leases", "create") not in grants  # no leader election

    extra = render("kubernetes/snapshot-controller-rbac")
    binding = only(extra, "ClusterRoleBinding")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "snapshot-controller", "namespace": "kube-system"}
    ]
    assert only(extra, "ClusterRole")["rules"] == [
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]}
    ]


@pytest.mark.parametrize(("name", "least"), [("fusedrive-node", 5), ("fusedrive-mounter", 3)])
def test_microk8s_overlay_moves_every_kubelet_path(name: str, least: int) -> None:
    ds = only(render("overlays/microk8s"), "DaemonSet", name)
    texts = [v for _, v in walk(ds) if isinstance(v, str)]
    kubelet_paths = [t for t in texts if "/lib/kubelet" in t]
    assert len(kubelet_paths) >= least
    for text in kubelet_paths:
        path = text.partition("=")[2] or text
        assert path.startswith(MICROK8S_KUBELET), f"left behind: {text}"


# -- the image ------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_entrypoint_is_an_installed_console_script() -> None:
    entry = [rest for word, rest in dockerfile_instructions() if word == "ENTRYPOINT"]
    assert len(entry) == 1
    argv = json.loads(entry[0])  # exec form: signals reach the plugin, not a shell
    assert argv[0] in PYPROJECT["project"]["scripts"]
    assert argv[0] == "fusedrive-csi"


def test_dockerfile_builds_from_the_repository() -> None:
    instrs = dockerfile_instructions()
    args = {}
    for word, rest in instrs:
        if word == "ARG" and "=" in rest:
            name, _, default = rest.partition("=")
            args[name] = default
    bases = [
        re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], rest.split()[0])
        for w, rest in instrs
        if w == "FROM"
    ]
    assert bases, "no FROM"
    for base in bases:
        tag = _tag(base)
        assert tag and tag != "latest", f"base image {base} is not pinned"
        assert base.startswith("python:3.11-slim"), base
    required = PYPROJECT["project"]["requires-python"].removeprefix(">=")
    assert tuple(map(int, required.split("."))) <= (3, 11)

    copied = {rest.split()[0] for word, rest in instrs if word == "COPY" and "--from" not in rest}
    packages = {
        p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    assert packages | {"pyproject.toml"} <= copied
    for src in copied:
        assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for src in copied:
        assert f"!{src}" in ignore or f"!{src}/" in ignore, f"{src} is not let into the context"

    for word, rest in instrs:
        if word == "RUN" and "apt-get install" in rest:
            assert "--no-install-recommends" in rest
            assert "rm -rf /var/lib/apt/lists/*" in rest
        if word == "RUN" and "pip install" in rest:
            assert "--no-cache-dir" in rest
    runtime = [rest for word, rest in instrs if word == "RUN" and "apt-get install" in rest][-1]
    for pkg in ("fuse3", "util-linux", "e2fsprogs", "mount"):
        assert re.search(rf"(?<![\w-]){pkg}(?![\w-])", runtime), f"{pkg} not in the runtime image"


def test_readme_names_only_paths_that_exist() -> None:
    readme = (DEPLOY / "README.md").read_text()
    paths = set(re.findall(r"(?<![\w/.-])(deploy/[\w./-]*[\w])", readme))
    assert "deploy/Dockerfile" in paths and "deploy/kubernetes" in paths
    for p in paths:
        assert (ROOT / p).exists(), f"deploy/README.md names {p}, which does not exist"


# -- the mounter (docs/restart.md) ------------------------------------------------------


@pytest.mark.parametrize("rel", NODE_VARIANTS)
def test_mounter_agrees_with_the_plugin(rel: str) -> None:
    """Its own DaemonSet, the socket the plugin dials, the paths the plugin stages in."""
    nspec = pod_spec(node_daemonset(rel))
    mds = mounter_daemonset(rel)
    mspec = pod_spec(mds)
    plugin = container(nspec, PLUGIN_CONTAINER)
    [mounter] = mspec["containers"]
    mflags, pflags = flags(mounter), flags(plugin)
    assert mounter["command"] == ["fusedrive-csi", "mounter"]
    assert mounter["image"] == plugin["image"]
    assert mounter["securityContext"]["privileged"] is True

    # One PID namespace for every process that opens the store (LMDB keys on PIDs).
    assert nspec["hostPID"] is True and mspec["hostPID"] is True

    # The socket: the same host directory in both pods, the same file.
    sock = mflags["socket"]
    assert sock is not None and pflags["mounter-socket"] == sock
    sock_dir = os.path.dirname(sock)
    for spec, c in ((mspec, mounter), (nspec, plugin)):
        assert mount_of(spec, c, "mounter-dir")["mountPath"] == sock_dir
        assert host_path(spec, "mounter-dir") == sock_dir

    # It mounts where kubelet and the plugin look, and its mounts reach the host.
    kubelet = host_path(nspec, "kubelet-dir")
    assert host_path(mspec, "kubelet-dir") == kubelet
    assert mount_of(mspec, mounter, "kubelet-dir")["mountPath"] == kubelet
    state = pflags["state-dir"]
    assert host_path(mspec, "state-dir") == state
    assert mount_of(mspec, mounter, "state-dir")["mountPath"] == state
    for vol in ("kubelet-dir", "state-dir"):
        assert mount_of(mspec, mounter, vol).get("mountPropagation") == "Bidirectional"
    prefixes = [a.partition("=")[2] for a in mounter["args"] if "allowed-path-prefix" in a]
    assert sorted(prefixes) == sorted([kubelet, state])

    # The same store and mount records as the plugin's.
    menv = env(mounter)
    assert mflags["store"] == pflags["store"] == menv["FUSEDRIVE_STORE"]
    assert host_path(mspec, "store-dir") == host_path(nspec, "store-dir")
    assert menv["FUSEDRIVE_RUNTIME_DIR"] == env(plugin)["FUSEDRIVE_RUNTIME_DIR"]
    assert host_path(mspec, "runtime-dir") == host_path(nspec, "runtime-dir")
    assert mount_of(mspec, mounter, "dev-dir")["mountPath"] == "/dev"

    # Its flags exist and parse (--help last: parse, then stop).
    script = Path(sys.executable).with_name("fusedrive-csi")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "csi_frontend.cli"]
    proc = subprocess.run(
        [*cmd, "mounter", *mounter["args"], "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, f"the mounter rejects {mounter['args']}: {proc.stderr}"


def test_only_the_plugin_restarts_by_itself() -> None:
    """A restart of the mounter ends every volume; one of the plugin costs them nothing."""
    mds = mounter_daemonset("kubernetes")
    [mounter] = pod_spec(mds)["containers"]
    assert mds["spec"]["updateStrategy"]["type"] == "OnDelete"
    assert "livenessProbe" not in mounter
    assert mounter["resources"]["requests"] and mounter["resources"]["limits"]["memory"]
    assert "cpu" not in mounter["resources"]["limits"]

    nds = node_daemonset("kubernetes")
    assert nds["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    probe = container(pod_spec(nds), PLUGIN_CONTAINER)["livenessProbe"]
    # A sidecar that is slow or briefly gone does not restart the plugin at once.
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 60
