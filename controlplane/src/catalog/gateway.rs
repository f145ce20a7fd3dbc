//! Gateway API's `HTTPRoute` and `GRPCRoute` (`gateway.networking.k8s.io/v1`), the part of
//! them Tern routes with, attached to a Service as GAMMA defines: path (prefix, exact or
//! regular expression), method, header and query matches (exact or regular expressions),
//! and the header modifier, URL rewrite and redirect filters. Fields Tern does not carry
//! out yet (the mirror and CORS filters, a rule's retry) are parsed so that using them is a
//! clear error rather than silently ignored; unknown fields are refused.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

/// An `HTTPRoute`.
pub type HttpRoute = Route<Rule>;
/// `HTTPRoute.spec`.
pub type HttpRouteSpec = RouteSpec<Rule>;
/// A `GRPCRoute` (`gateway.networking.k8s.io/v1`): routes gRPC calls by service and method.
/// Tern carries it as the [`HttpRoute`] it is equivalent to (a call to `pkg.Svc/Method` is a
/// request for the path `/pkg.Svc/Method`), see [`Route::into_http_route`].
pub type GrpcRoute = Route<GrpcRule>;

/// A route of Gateway API's, `R` its kind of rule: `HTTPRoute` and `GRPCRoute` differ only
/// there.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Route<R> {
    /// `gateway.networking.k8s.io/v1` (or `v1beta1` for `HTTPRoute`).
    pub api_version: String,
    /// `HTTPRoute` or `GRPCRoute`.
    pub kind: String,
    /// Name and namespace.
    pub metadata: ObjectMeta,
    /// What to route.
    pub spec: RouteSpec<R>,
    /// Written by controllers; ignored on input.
    #[serde(default, skip_serializing)]
    pub status: Option<serde_json::Value>,
}

/// A route's `spec`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteSpec<R> {
    /// The Services (GAMMA) this route attaches to.
    #[serde(default)]
    pub parent_refs: Vec<ParentRef>,
    /// Host names (`Host`, `:authority`) requests must carry; empty means any.
    #[serde(default)]
    pub hostnames: Vec<String>,
    /// Matches and where they go.
    // (`Vec::new` rather than `default`, which would ask `R: Default` of the rule type.)
    #[serde(default = "Vec::new")]
    pub rules: Vec<R>,
}

/// A Service this route attaches to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ParentRef {
    /// `""` or `core` for a Service.
    #[serde(default)]
    pub group: Option<String>,
    /// `Service` for the mesh.
    #[serde(default)]
    pub kind: Option<String>,
    /// The Service's name.
    pub name: String,
    /// Its namespace; the route's by default.
    #[serde(default)]
    pub namespace: Option<String>,
    /// One port of the Service; all of them when absent.
    #[serde(default)]
    pub port: Option<u16>,
    /// Not used for Services.
    #[serde(default)]
    pub section_name: Option<String>,
}

/// A routing rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    /// A name for the rule.
    #[serde(default)]
    pub name: Option<String>,
    /// Any one of these matches; none means every request.
    #[serde(default)]
    pub matches: Vec<Match>,
    /// Where matched requests go, split by weight.
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
    /// Request timeouts.
    #[serde(default)]
    pub timeouts: Option<Timeouts>,
    /// What to do to matched requests (header modifiers, a URL rewrite or a redirect).
    #[serde(default)]
    pub filters: Option<Vec<Filter>>,
    /// Not supported yet.
    #[serde(default)]
    pub retry: Option<serde_json::Value>,
    /// Not supported yet.
    #[serde(default)]
    pub session_persistence: Option<serde_json::Value>,
}

/// What a request must look like.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Match {
    /// The path.
    #[serde(default)]
    pub path: Option<PathMatch>,
    /// Headers the request must carry (all of them).
    #[serde(default)]
    pub headers: Option<Vec<HeaderMatch>>,
    /// Query parameters the request must carry (all of them).
    #[serde(default)]
    pub query_params: Option<Vec<HeaderMatch>>,
    /// The method.
    #[serde(default)]
    pub method: Option<String>,
}

/// A header or query parameter match (`HTTPHeaderMatch`, `HTTPQueryParamMatch`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderMatch {
    /// `Exact` (the default) or `RegularExpression`.
    #[serde(default = "default_exact", rename = "type")]
    pub kind: String,
    /// The header's name (case-insensitive) or the parameter's (case-sensitive).
    pub name: String,
    /// The value it must have, or the regular expression its whole value must match.
    pub value: String,
}

impl HeaderMatch {
    /// The proxy's match: `RegularExpression` is a regular expression, anything else (which
    /// validation refuses) exact.
    pub fn to_config(&self) -> shared::config::ValueMatch {
        shared::config::ValueMatch {
            name: self.name.clone(),
            value: self.value.clone(),
            regex: self.kind == "RegularExpression",
        }
    }
}

/// A rule's filter (`HTTPRouteFilter`, `GRPCRouteFilter`): its `type` names the field that
/// says what it does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Filter {
    /// `RequestHeaderModifier`, `ResponseHeaderModifier`, `RequestRedirect`, `URLRewrite`;
    /// the others are not supported yet.
    #[serde(rename = "type")]
    pub kind: String,
    /// For `RequestHeaderModifier` (`HTTPHeaderFilter`: `set`, `add`, `remove`, the shape
    /// the proxy's routes take).
    #[serde(default)]
    pub request_header_modifier: Option<shared::config::HeaderModifier>,
    /// For `ResponseHeaderModifier`.
    #[serde(default)]
    pub response_header_modifier: Option<shared::config::HeaderModifier>,
    /// For `RequestRedirect`.
    #[serde(default)]
    pub request_redirect: Option<RequestRedirect>,
    /// For `URLRewrite`.
    #[serde(default)]
    pub url_rewrite: Option<UrlRewrite>,
    /// Not supported yet.
    #[serde(default)]
    pub request_mirror: Option<serde_json::Value>,
    /// Not supported yet.
    #[serde(default)]
    pub cors: Option<serde_json::Value>,
    /// Not supported.
    #[serde(default)]
    pub extension_ref: Option<serde_json::Value>,
}

/// `HTTPRequestRedirectFilter`: the parts of the request's URL a redirect replaces.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestRedirect {
    /// `http` or `https`.
    #[serde(default)]
    pub scheme: Option<String>,
    /// The host name.
    #[serde(default)]
    pub hostname: Option<String>,
    /// The path.
    #[serde(default)]
    pub path: Option<PathModifier>,
    /// The port.
    #[serde(default)]
    pub port: Option<u16>,
    /// 301, 302 (the default), 303, 307 or 308.
    #[serde(default)]
    pub status_code: Option<u16>,
}

/// `HTTPURLRewriteFilter`: the host and path a request goes upstream with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UrlRewrite {
    /// The host name.
    #[serde(default)]
    pub hostname: Option<String>,
    /// The path.
    #[serde(default)]
    pub path: Option<PathModifier>,
}

/// `HTTPPathModifier`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PathModifier {
    /// `ReplaceFullPath` or `ReplacePrefixMatch`.
    #[serde(rename = "type")]
    pub kind: String,
    /// For `ReplaceFullPath`.
    #[serde(default)]
    pub replace_full_path: Option<String>,
    /// For `ReplacePrefixMatch`.
    #[serde(default)]
    pub replace_prefix_match: Option<String>,
}

impl PathModifier {
    /// The proxy's path rewrite; the error names the field within the modifier.
    pub fn to_config(&self) -> Result<shared::config::PathRewrite, (&'static str, String)> {
        use shared::config::PathRewrite;
        match (
            self.kind.as_str(),
            &self.replace_full_path,
            &self.replace_prefix_match,
        ) {
            ("ReplaceFullPath", Some(path), None) => Ok(PathRewrite::ReplaceFullPath(path.clone())),
            ("ReplacePrefixMatch", None, Some(prefix)) => {
                Ok(PathRewrite::ReplacePrefixMatch(prefix.clone()))
            }
            ("ReplaceFullPath", _, _) => Err((
                "replaceFullPath",
                "is required for type ReplaceFullPath, and alone".to_owned(),
            )),
            ("ReplacePrefixMatch", _, _) => Err((
                "replacePrefixMatch",
                "is required for type ReplacePrefixMatch, and alone".to_owned(),
            )),
            (other, _, _) => Err(("type", format!("unknown type `{other}`"))),
        }
    }

    /// A filter's optional `path` as the proxy's path rewrite; the error names the field
    /// within the filter (`path.…`).
    fn to_config_at(
        path: Option<&PathModifier>,
    ) -> Result<Option<shared::config::PathRewrite>, (String, String)> {
        path.map(|path| {
            path.to_config()
                .map_err(|(field, why)| (format!("path.{field}"), why))
        })
        .transpose()
    }
}

impl RequestRedirect {
    /// The proxy's redirect; the error names the field within the filter.
    pub fn to_config(&self) -> Result<shared::config::Redirect, (String, String)> {
        let path = PathModifier::to_config_at(self.path.as_ref())?;
        Ok(shared::config::Redirect {
            scheme: self.scheme.clone(),
            hostname: self.hostname.clone(),
            port: self.port,
            path,
            status: self.status_code.unwrap_or(302),
        })
    }
}

impl UrlRewrite {
    /// The proxy's rewrite; the error names the field within the filter.
    pub fn to_config(&self) -> Result<shared::config::Rewrite, (String, String)> {
        let path = PathModifier::to_config_at(self.path.as_ref())?;
        Ok(shared::config::Rewrite {
            hostname: self.hostname.clone(),
            path,
        })
    }
}

/// What one of a rule's matches asks of a request, as the proxy's routes say it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Matched {
    /// The path: a prefix, exact, or a regular expression.
    pub path: shared::config::PathMatch,
    /// The method.
    pub method: Option<String>,
    /// Header matches: lower-case names, sorted.
    pub headers: Vec<shared::config::ValueMatch>,
    /// Query parameter matches, sorted.
    pub query: Vec<shared::config::ValueMatch>,
}

fn default_exact() -> String {
    "Exact".to_owned()
}

/// A path match.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PathMatch {
    /// `PathPrefix` (the default), `Exact` or `RegularExpression`.
    #[serde(default = "default_path_type", rename = "type")]
    pub kind: String,
    /// The path; `/` by default.
    #[serde(default = "default_path")]
    pub value: String,
}

impl PathMatch {
    /// The proxy's path match: `Exact`, `RegularExpression`, else (`PathPrefix`; validation
    /// refuses other types) a prefix.
    pub fn to_config(&self) -> shared::config::PathMatch {
        match self.kind.as_str() {
            "Exact" => shared::config::PathMatch::Exact(self.value.clone()),
            "RegularExpression" => shared::config::PathMatch::Regex(self.value.clone()),
            _ => shared::config::PathMatch::Prefix(self.value.clone()),
        }
    }
}

fn default_path_type() -> String {
    "PathPrefix".to_owned()
}
fn default_path() -> String {
    "/".to_owned()
}

/// A Service port and its share of a rule's requests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendRef {
    /// `""` or `core`.
    #[serde(default)]
    pub group: Option<String>,
    /// `Service`.
    #[serde(default)]
    pub kind: Option<String>,
    /// The Service's name.
    pub name: String,
    /// Its namespace; the route's by default.
    #[serde(default)]
    pub namespace: Option<String>,
    /// The Service port.
    #[serde(default)]
    pub port: Option<u16>,
    /// Relative share; 1 by default.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Not supported yet.
    #[serde(default)]
    pub filters: Option<Vec<serde_json::Value>>,
}

fn default_weight() -> u32 {
    1
}

/// Gateway API durations (`10s`, `500ms`, `1m30s`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Timeouts {
    /// The whole request, from the client's view.
    #[serde(default)]
    pub request: Option<String>,
    /// One try to a backend.
    #[serde(default)]
    pub backend_request: Option<String>,
}

impl HttpRouteSpec {
    /// The host names requests must carry: `*` when none is listed.
    pub fn hosts(&self) -> Vec<String> {
        if self.hostnames.is_empty() {
            vec!["*".to_owned()]
        } else {
            self.hostnames.clone()
        }
    }
}

impl Rule {
    /// What this rule matches, one entry per match (a match with no path has the prefix
    /// `/`); every request when it has no matches.
    pub fn matched(&self) -> Vec<Matched> {
        if self.matches.is_empty() {
            return vec![Matched {
                path: shared::config::PathMatch::Prefix("/".to_owned()),
                method: None,
                headers: Vec::new(),
                query: Vec::new(),
            }];
        }
        self.matches
            .iter()
            .map(|m| {
                let path = m.path.as_ref().map_or_else(
                    || shared::config::PathMatch::Prefix("/".to_owned()),
                    PathMatch::to_config,
                );
                let mut headers: Vec<shared::config::ValueMatch> = m
                    .headers
                    .iter()
                    .flatten()
                    .map(|h| shared::config::ValueMatch {
                        name: h.name.to_ascii_lowercase(),
                        ..h.to_config()
                    })
                    .collect();
                headers.sort();
                let mut query: Vec<shared::config::ValueMatch> = m
                    .query_params
                    .iter()
                    .flatten()
                    .map(HeaderMatch::to_config)
                    .collect();
                query.sort();
                Matched {
                    path,
                    method: m.method.clone(),
                    headers,
                    query,
                }
            })
            .collect()
    }

    /// The redirect the rule answers with (validated: it converts).
    pub fn redirect(&self) -> Option<shared::config::Redirect> {
        self.filters
            .iter()
            .flatten()
            .find_map(|f| f.request_redirect.as_ref()?.to_config().ok())
    }

    /// The rewrite the rule makes (validated: it converts).
    pub fn rewrite(&self) -> Option<shared::config::Rewrite> {
        self.filters
            .iter()
            .flatten()
            .find_map(|f| f.url_rewrite.as_ref()?.to_config().ok())
    }

    /// The changes the rule's filters make to requests' and responses' headers (validated:
    /// at most one modifier of each).
    pub fn header_modifiers(
        &self,
    ) -> (
        shared::config::HeaderModifier,
        shared::config::HeaderModifier,
    ) {
        let mut filters = self.filters.iter().flatten();
        let request = filters
            .clone()
            .find_map(|f| f.request_header_modifier.clone())
            .unwrap_or_default();
        let response = filters
            .find_map(|f| f.response_header_modifier.clone())
            .unwrap_or_default();
        (request, response)
    }
}

/// Whether a group/kind pair names a core `Service`.
pub fn is_service(group: Option<&str>, kind: Option<&str>) -> bool {
    matches!(group, None | Some("" | "core")) && matches!(kind, None | Some("Service"))
}

/// A `GRPCRoute` rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcRule {
    /// A name for the rule.
    #[serde(default)]
    pub name: Option<String>,
    /// Any one of these matches; none means every call.
    #[serde(default)]
    pub matches: Vec<GrpcMatch>,
    /// Where matched calls go, split by weight.
    #[serde(default)]
    pub backend_refs: Vec<BackendRef>,
    /// What to do to matched calls on the way (header modifiers).
    #[serde(default)]
    pub filters: Option<Vec<Filter>>,
    /// Not supported yet.
    #[serde(default)]
    pub session_persistence: Option<serde_json::Value>,
}

/// What a call must look like.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcMatch {
    /// The gRPC service and method.
    #[serde(default)]
    pub method: Option<MethodMatch>,
    /// Headers (metadata) the call must carry (all of them).
    #[serde(default)]
    pub headers: Option<Vec<HeaderMatch>>,
}

/// A gRPC method match.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MethodMatch {
    /// `Exact` (the default) or `RegularExpression` (of the service and the method each).
    #[serde(default = "default_exact", rename = "type")]
    pub kind: String,
    /// The fully qualified service, `pkg.Service`.
    #[serde(default)]
    pub service: Option<String>,
    /// The method.
    #[serde(default)]
    pub method: Option<String>,
}

impl Route<GrpcRule> {
    /// The equivalent `HTTPRoute` (its `kind` stays `GRPCRoute`): each method match becomes a
    /// path, exactly `/pkg.Service/Method`, the prefix `/pkg.Service` for all of a service's
    /// methods, or for `RegularExpression` the regular expression `/(?:service)/(?:method)`
    /// (each part one segment, `[^/]+`, when absent; each checked on its own).
    /// What has no equivalent is refused with its field.
    pub fn into_http_route(self) -> Result<HttpRoute, (String, String)> {
        let mut rules = Vec::with_capacity(self.spec.rules.len());
        for (i, rule) in self.spec.rules.into_iter().enumerate() {
            let mut matches = Vec::with_capacity(rule.matches.len());
            for (j, m) in rule.matches.into_iter().enumerate() {
                let at = |f: &str| format!("spec.rules[{i}].matches[{j}].{f}");
                let (kind, path) = match m.method {
                    None => ("PathPrefix", "/".to_owned()),
                    Some(method) if method.kind == "RegularExpression" => {
                        // Each part a regular expression that stands on its own (it cannot
                        // reach into the other's group); one segment, `[^/]+`, when absent.
                        for (field, part) in
                            [("service", &method.service), ("method", &method.method)]
                        {
                            if let Some(Err(why)) = part.as_deref().map(shared::config::full_match)
                            {
                                return Err((at(&format!("method.{field}")), why));
                            }
                        }
                        let part = |p: Option<String>| p.unwrap_or_else(|| "[^/]+".to_owned());
                        let path =
                            format!("/(?:{})/(?:{})", part(method.service), part(method.method));
                        ("RegularExpression", path)
                    }
                    Some(method) => {
                        if method.kind != "Exact" {
                            return Err((
                                at("method.type"),
                                format!("unknown type `{}`", method.kind),
                            ));
                        }
                        match (method.service, method.method) {
                            (Some(service), Some(name)) => ("Exact", format!("/{service}/{name}")),
                            (Some(service), None) => ("PathPrefix", format!("/{service}")),
                            (None, Some(_)) => {
                                return Err((
                                    at("method.service"),
                                    "an exact method match needs its service".to_owned(),
                                ));
                            }
                            (None, None) => ("PathPrefix", "/".to_owned()),
                        }
                    }
                };
                if kind != "RegularExpression"
                    && (path.contains(char::is_whitespace) || path.contains("//"))
                {
                    return Err((at("method"), format!("`{path}` is not a gRPC method path")));
                }
                matches.push(Match {
                    path: Some(PathMatch {
                        kind: kind.to_owned(),
                        value: path,
                    }),
                    headers: m.headers,
                    query_params: None,
                    method: None,
                });
            }
            rules.push(Rule {
                name: rule.name,
                matches,
                backend_refs: rule.backend_refs,
                timeouts: None,
                filters: rule.filters,
                retry: None,
                session_persistence: rule.session_persistence,
            });
        }
        Ok(HttpRoute {
            api_version: self.api_version,
            kind: self.kind,
            metadata: self.metadata,
            spec: HttpRouteSpec {
                parent_refs: self.spec.parent_refs,
                hostnames: self.spec.hostnames,
                rules,
            },
            status: None,
        })
    }
}
