#![allow(clippy::unwrap_used)]

use base64::Engine as _;
use serde_json::{Value, json};

use super::*;

const IMAGE: &str = "registry.example/tern-proxy:1";
const ROOT: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

fn sidecar() -> Sidecar {
    Sidecar {
        image: IMAGE.into(),
        control: "tern-control.tern-system.svc:15012".parse().unwrap(),
        trust_domain: "mesh.example".into(),
        trace_collector: None,
    }
}

/// A Pod as a ReplicaSet controller has the API server create it: a generated name, no
/// namespace in the object, a readiness probe by port name.
fn pod(annotations: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "web-7d9f-",
            "labels": { "app": "web" },
            "annotations": annotations,
            "ownerReferences": [{ "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7d9f", "uid": "u1" }],
        },
        "spec": {
            "serviceAccountName": "web",
            "containers": [{
                "name": "web",
                "image": "web:1",
                "ports": [{ "name": "http", "containerPort": 8080, "protocol": "TCP" }],
                "readinessProbe": { "httpGet": { "path": "/ready", "port": "http", "scheme": "HTTP" }, "periodSeconds": 10 },
                "volumeMounts": [{ "name": "kube-api-access-x", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true }],
            }],
            "volumes": [{ "name": "kube-api-access-x", "projected": { "defaultMode": 420, "sources": [{ "serviceAccountToken": { "path": "token", "expirationSeconds": 3607 } }] } }],
            "restartPolicy": "Always",
        },
    })
}

fn admission(object: Value, kind: Value) -> Vec<u8> {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": kind,
            "resource": { "group": "", "version": "v1", "resource": "pods" },
            "namespace": "shop",
            "operation": "CREATE",
            "userInfo": { "username": "system:serviceaccount:kube-system:replicaset-controller" },
            "object": object,
            "oldObject": null,
            "dryRun": false,
        },
    })
    .to_string()
    .into_bytes()
}

fn pod_kind() -> Value {
    json!({ "group": "", "version": "v1", "kind": "Pod" })
}

/// The response's patch, decoded, if it has one.
fn patch_of(answer: &Value) -> Option<json_patch::Patch> {
    let response = &answer["response"];
    let patch = response["patch"].as_str()?;
    assert_eq!(response["patchType"], "JSONPatch");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(patch)
        .unwrap();
    Some(serde_json::from_slice(&bytes).unwrap())
}

#[test]
fn a_pod_s_patch_makes_the_pod_ternctl_inject_makes() {
    let original = pod(json!({ "team": "shop" }));
    let answer = review(&admission(original.clone(), pod_kind()), &sidecar()).unwrap();
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["kind"], "AdmissionReview");
    assert_eq!(
        answer["response"]["uid"],
        "705ab4f5-6393-11e8-b7cc-42010a800002"
    );
    assert_eq!(answer["response"]["allowed"], true);
    let mut patched = original.clone();
    json_patch::patch(&mut patched, &patch_of(&answer).unwrap()).unwrap();

    let yaml = serde_yaml::to_string(&original).unwrap();
    let text = inject::manifests(&yaml, &sidecar(), ROOT).unwrap();
    let documents: Vec<Value> = text
        .split("---\n")
        .filter(|d| !d.trim().is_empty())
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(patched, documents[0]);
    // What it did: the sidecar and its init container first, the probe moved, the Pod's
    // own fields kept.
    let init: Vec<&str> = patched["spec"]["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(init, ["tern-init", "tern-proxy"]);
    assert_eq!(patched["spec"]["initContainers"][1]["image"], IMAGE);
    assert_eq!(
        patched["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"],
        15020
    );
    assert_eq!(patched["metadata"]["annotations"]["team"], "shop");
    assert_eq!(
        patched["metadata"]["annotations"]["tern.dev/injected"],
        "true"
    );
    assert_eq!(patched["spec"]["volumes"].as_array().unwrap().len(), 3);
}

#[test]
fn a_pod_without_annotations_or_init_containers_is_patched_from_nothing() {
    let mut original = pod(Value::Null);
    original["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("annotations");
    original["spec"].as_object_mut().unwrap().remove("volumes");
    let answer = review(&admission(original.clone(), pod_kind()), &sidecar()).unwrap();
    let mut patched = original;
    json_patch::patch(&mut patched, &patch_of(&answer).unwrap()).unwrap();
    assert_eq!(
        patched["metadata"]["annotations"]["tern.dev/interception"],
        "enabled"
    );
    assert_eq!(patched["spec"]["initContainers"][1]["name"], "tern-proxy");
    assert_eq!(patched["spec"]["volumes"][0]["name"], "tern-config");
}

#[test]
fn pods_left_alone_and_other_kinds_are_allowed_unchanged() {
    let opted_out = pod(json!({ "tern.dev/inject": "disabled" }));
    let injected = pod(json!({ "tern.dev/injected": "true" }));
    let mut host = pod(json!({}));
    host["spec"]["hostNetwork"] = true.into();
    for object in [opted_out, injected, host] {
        let answer = review(&admission(object, pod_kind()), &sidecar()).unwrap();
        assert_eq!(answer["response"]["allowed"], true);
        assert!(patch_of(&answer).is_none(), "{answer}");
    }
    // A Pod that exists already is not changed (its containers cannot be).
    let mut update: Value = serde_json::from_slice(&admission(pod(json!({})), pod_kind())).unwrap();
    update["request"]["operation"] = "UPDATE".into();
    let answer = review(update.to_string().as_bytes(), &sidecar()).unwrap();
    assert_eq!(answer["response"]["allowed"], true);
    assert!(patch_of(&answer).is_none(), "{answer}");
    let deployment = json!({ "group": "apps", "version": "v1", "kind": "Deployment" });
    let answer = review(&admission(json!({ "spec": {} }), deployment), &sidecar()).unwrap();
    assert_eq!(answer["response"]["allowed"], true);
    assert!(patch_of(&answer).is_none());
}

#[test]
fn names_from_the_pod_are_written_as_values_whatever_they_hold() {
    // The webhook sees a Pod before the API server validates it.
    let mut original = pod(json!({}));
    original["spec"]["containers"][0]["name"] = "web\u{7}\"x: y".into();
    let answer = review(&admission(original.clone(), pod_kind()), &sidecar()).unwrap();
    let mut patched = original;
    json_patch::patch(&mut patched, &patch_of(&answer).unwrap()).unwrap();
    assert_eq!(
        patched["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"],
        "/app-health/web\u{7}\"x: y/readyz"
    );
}

#[test]
fn what_is_not_an_admission_review_v1_is_refused_with_why() {
    let error = review(b"{\"apiVersion\": ", &sidecar()).unwrap_err();
    assert!(matches!(error, BadReview::Malformed(_)), "{error}");
    let error = review(b"{\"apiVersion\": \"v1\", \"kind\": \"Pod\"}", &sidecar()).unwrap_err();
    assert!(
        error.to_string().contains("missing field `request`"),
        "{error}"
    );
    let mut old = serde_json::from_slice::<Value>(&admission(pod(json!({})), pod_kind())).unwrap();
    old["apiVersion"] = "admission.k8s.io/v1beta1".into();
    let error = review(old.to_string().as_bytes(), &sidecar()).unwrap_err();
    assert!(
        error.to_string().contains("admission.k8s.io/v1beta1"),
        "{error}"
    );
}

#[test]
fn the_ca_bundle_patch_sets_each_stale_webhook_s_bundle_and_checks_its_name() {
    let current = base64::engine::general_purpose::STANDARD.encode(ROOT);
    let configuration = json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": { "name": CONFIGURATION },
        "webhooks": [
            { "name": "a.tern.dev", "clientConfig": { "service": { "name": "tern-control", "namespace": "tern-system" } },
              "sideEffects": "None", "admissionReviewVersions": ["v1"] },
            { "name": "b.tern.dev", "clientConfig": { "caBundle": current },
              "sideEffects": "None", "admissionReviewVersions": ["v1"] },
            { "name": "c.tern.dev", "clientConfig": { "caBundle": "b2xk" },
              "sideEffects": "None", "admissionReviewVersions": ["v1"] },
        ],
    });
    let typed = serde_json::from_value(configuration.clone()).unwrap();
    let patch = ca_bundle_patch(&typed, ROOT);
    assert_eq!(patch.0.len(), 4, "{patch:?}");
    let mut patched = configuration.clone();
    json_patch::patch(&mut patched, &patch).unwrap();
    for webhook in patched["webhooks"].as_array().unwrap() {
        assert_eq!(webhook["clientConfig"]["caBundle"], current);
    }
    // Written once, it is current.
    let typed = serde_json::from_value(patched).unwrap();
    assert!(ca_bundle_patch(&typed, ROOT).0.is_empty());
    // If the list changed in between, the patch fails rather than set another webhook's.
    let mut reordered = configuration;
    reordered["webhooks"].as_array_mut().unwrap().swap(0, 1);
    assert!(json_patch::patch(&mut reordered, &patch).is_err());
}
