//! The OpenAPI document: well-formed 3.1, every `$ref` resolves, every contract endpoint is in
//! it, and every operation it lists is really served by the router.

mod common;

use common::{Backend, TestApp};
use serde_json::Value;

/// The admin API contract of DESIGN.md (data planes and config come with later issues).
const CONTRACT: &[(&str, &str)] = &[
    ("get", "/admin/v1/upstreams"),
    ("post", "/admin/v1/upstreams"),
    ("get", "/admin/v1/upstreams/{id}"),
    ("put", "/admin/v1/upstreams/{id}"),
    ("patch", "/admin/v1/upstreams/{id}"),
    ("delete", "/admin/v1/upstreams/{id}"),
    ("get", "/admin/v1/routes"),
    ("post", "/admin/v1/routes"),
    ("get", "/admin/v1/routes/{id}"),
    ("put", "/admin/v1/routes/{id}"),
    ("patch", "/admin/v1/routes/{id}"),
    ("delete", "/admin/v1/routes/{id}"),
    ("get", "/admin/v1/consumers"),
    ("post", "/admin/v1/consumers"),
    ("get", "/admin/v1/consumers/{id}"),
    ("put", "/admin/v1/consumers/{id}"),
    ("patch", "/admin/v1/consumers/{id}"),
    ("delete", "/admin/v1/consumers/{id}"),
    ("get", "/admin/v1/consumers/{id}/keys"),
    ("post", "/admin/v1/consumers/{id}/keys"),
    ("delete", "/admin/v1/consumers/{id}/keys/{key_id}"),
    ("get", "/admin/v1/consumers/{id}/usage"),
    ("get", "/admin/v1/plans"),
    ("post", "/admin/v1/plans"),
    ("get", "/admin/v1/plans/{id}"),
    ("put", "/admin/v1/plans/{id}"),
    ("patch", "/admin/v1/plans/{id}"),
    ("delete", "/admin/v1/plans/{id}"),
    ("get", "/admin/v1/jwt-issuers"),
    ("post", "/admin/v1/jwt-issuers"),
    ("get", "/admin/v1/jwt-issuers/{id}"),
    ("put", "/admin/v1/jwt-issuers/{id}"),
    ("patch", "/admin/v1/jwt-issuers/{id}"),
    ("delete", "/admin/v1/jwt-issuers/{id}"),
    ("get", "/admin/v1/status"),
    ("get", "/admin/v1/data-planes"),
    ("get", "/admin/v1/config"),
    ("put", "/admin/v1/config"),
];

fn collect_refs(value: &Value, refs: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            if let Some(Value::String(r)) = map.get("$ref") {
                refs.push(r.clone());
            }
            map.values().for_each(|v| collect_refs(v, refs));
        }
        Value::Array(items) => items.iter().for_each(|v| collect_refs(v, refs)),
        _ => {}
    }
}

#[tokio::test]
async fn openapi_document_is_complete_and_matches_the_router() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let spec: Value = app
        .client
        .get(format!("{}/openapi.json", app.base))
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("openapi.json is JSON");

    assert_eq!(spec["openapi"], "3.1.0");
    assert!(spec["info"]["title"].is_string());
    assert!(spec["components"]["securitySchemes"]["admin_token"].is_object());

    // Every reference resolves.
    let schemas = spec["components"]["schemas"].as_object().expect("schemas");
    let mut refs = Vec::new();
    collect_refs(&spec, &mut refs);
    assert!(!refs.is_empty());
    for r in &refs {
        let name = r
            .strip_prefix("#/components/schemas/")
            .unwrap_or_else(|| panic!("unexpected $ref {r}"));
        assert!(schemas.contains_key(name), "dangling $ref {r}");
    }
    // Resource schemas carry examples.
    for name in [
        "Upstream",
        "Route",
        "Consumer",
        "Plan",
        "JwtIssuer",
        "Problem",
        "IssuedKey",
    ] {
        assert!(
            schemas[name].get("example").is_some() || schemas[name].get("examples").is_some(),
            "{name} has no example"
        );
    }

    // Every contract endpoint is documented…
    let paths = spec["paths"].as_object().expect("paths");
    for (method, path) in CONTRACT {
        let operation = &paths.get(*path).unwrap_or_else(|| panic!("{path} missing"))[*method];
        assert!(
            operation.is_object(),
            "{method} {path} missing from the document"
        );
        assert!(
            operation["responses"]
                .as_object()
                .is_some_and(|r| !r.is_empty())
        );
        assert!(operation["tags"].is_array(), "{method} {path} has no tag");
    }
    // …and every documented operation is served (not the fallback 404, not 405).
    let mut operations = 0;
    for (path, item) in paths {
        for method in item.as_object().expect("path item").keys() {
            operations += 1;
            let concrete = path.replace("{id}", "x").replace("{key_id}", "y");
            let response = app
                .client
                .request(
                    method.to_uppercase().parse().expect("method"),
                    format!("{}{concrete}", app.base),
                )
                .bearer_auth(&app.token)
                .header("content-type", "application/json")
                .body("{}")
                .send()
                .await
                .expect("request");
            let status = response.status().as_u16();
            let body = response.text().await.unwrap_or_default();
            assert_ne!(status, 405, "{method} {path} is not routed");
            assert!(
                !body.contains("no such endpoint"),
                "{method} {path} is not routed"
            );
        }
    }
    assert_eq!(
        operations,
        CONTRACT.len(),
        "the document lists operations beyond the contract list"
    );

    // The interactive docs are served.
    let docs = app
        .client
        .get(format!("{}/docs/", app.base))
        .send()
        .await
        .expect("request");
    assert_eq!(docs.status(), 200);
    assert!(docs.text().await.unwrap_or_default().contains("swagger"));
}
