"""deploy/overlays/group-snapshots: the base plus what VolumeGroupSnapshot needs.

The overlay turns on csi-snapshotter's CSIVolumeGroupSnapshot feature gate and binds
the extra RBAC the sidecar then uses; the base (deploy/kubernetes) stays without the
gate, because a snapshotter with the gate on but without the group snapshot CRDs
stops serving ordinary snapshots. Rendering and schema validation of the overlay are
in test_manifests.py (every kustomization); this checks what it changes.
"""

from __future__ import annotations

from tests.deploy.test_manifests import container, flags, only, pod_spec, render

OVERLAY = "overlays/group-snapshots"
GATE = "CSIVolumeGroupSnapshot=true"


def test_only_the_overlay_turns_the_group_snapshot_gate_on() -> None:
    base = pod_spec(only(render("kubernetes"), "DaemonSet", "fusedrive-node"))
    assert "feature-gates" not in flags(container(base, "csi-snapshotter"))
    spec = pod_spec(only(render(OVERLAY), "DaemonSet", "fusedrive-node"))
    snap = flags(container(spec, "csi-snapshotter"))
    assert snap["feature-gates"] == GATE
    assert "node-deployment" in snap  # still distributed, like the base
    # nothing else changed: every other container is the base's
    others = [c for c in spec["containers"] if c["name"] != "csi-snapshotter"]
    assert others == [c for c in base["containers"] if c["name"] != "csi-snapshotter"]


def test_the_group_snapshotter_rbac_is_bound_to_the_node_service_account() -> None:
    objs = render(OVERLAY)
    sa = only(objs, "ServiceAccount")
    role = only(objs, "ClusterRole", "fusedrive-external-group-snapshotter")
    binding = only(objs, "ClusterRoleBinding", "fusedrive-external-group-snapshotter")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {
            "kind": "ServiceAccount",
            "name": sa["metadata"]["name"],
            "namespace": sa["metadata"]["namespace"],
        }
    ]
    grants = {
        (group, res, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for res in rule["resources"]
        for verb in rule["verbs"]
    }
    assert ("groupsnapshot.storage.k8s.io", "volumegroupsnapshotcontents/status", "patch") in grants
    assert ("groupsnapshot.storage.k8s.io", "volumegroupsnapshotclasses", "watch") in grants
    assert ("snapshot.storage.k8s.io", "volumesnapshotcontents", "create") in grants
    assert all("*" not in g for g in grants)
    assert not any(res == "secrets" for _g, res, _v in grants)
