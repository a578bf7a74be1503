//! The REST tagging API (`/rest/com/vmware/cis/...`): categories, tags, attach and detach.
//! A session is created with basic auth and re-created once when it expires (401).

use crate::client::{Client, MoRef};
use crate::vm::Change;
use crate::Error;
use serde_json::{json, Value};

const SESSION_HEADER: &str = "vmware-api-session-id";

impl Client {
    fn rest_url(&self, path: &str) -> String {
        let base = self.url().trim_end_matches('/').trim_end_matches("/sdk");
        format!("{base}/rest/com/vmware/cis{path}")
    }

    async fn rest_session(&self, stale: Option<&str>) -> Result<String, Error> {
        let mut slot = self.rest_session.lock().await;
        if let Some(s) = slot.as_deref() {
            if Some(s) != stale {
                return Ok(s.to_string());
            }
        }
        let url = self.rest_url("/session");
        let resp = self
            .http
            .post(&url)
            .basic_auth(&self.opts.username, Some(&self.opts.password))
            .send()
            .await
            .map_err(|e| Error::Connection(format!("POST {url}: {e}")))?;
        let status = resp.status();
        let body: Value = crate::client::read_bounded(
            resp,
            crate::client::MAX_RESPONSE,
            "POST /rest/com/vmware/cis/session",
            &url,
        )
        .await
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null);
        if status.as_u16() == 401 {
            return Err(Error::Fault {
                method: "POST /rest/com/vmware/cis/session".into(),
                name: "InvalidLogin".into(),
                message: body.to_string(),
            });
        }
        let id = body["value"].as_str().ok_or_else(|| Error::Protocol {
            method: "POST /rest/com/vmware/cis/session".into(),
            message: format!("HTTP {status}: {body}"),
        })?;
        *slot = Some(id.to_string());
        Ok(id.to_string())
    }

    /// Calls the REST API; `None` body for GET. Returns the `value` of the answer.
    pub async fn rest(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, Error> {
        // A dry run reads (GET, `~action=list…`) but changes nothing.
        if crate::journal::TaskJournal::is_planning()
            && method != reqwest::Method::GET
            && !path.contains("~action=list")
        {
            crate::journal::TaskJournal::plan(format!("{method} {path}"));
            return Ok(Value::String("(dry run)".into()));
        }
        let url = self.rest_url(path);
        let mut session = self.rest_session(None).await?;
        for attempt in 0..2 {
            let mut req = self
                .http
                .request(method.clone(), &url)
                .header(SESSION_HEADER, &session);
            if let Some(b) = &body {
                req = req.json(b);
            }
            let resp = req
                .send()
                .await
                .map_err(|e| Error::Connection(format!("{method} {url}: {e}")))?;
            let status = resp.status();
            if status.as_u16() == 401 && attempt == 0 {
                session = self.rest_session(Some(&session)).await?;
                continue;
            }
            let text = crate::client::read_bounded(
                resp,
                crate::client::MAX_RESPONSE,
                &format!("{method} {path}"),
                &url,
            )
            .await?;
            if !status.is_success() {
                let v: Value = serde_json::from_str(&text).unwrap_or(Value::String(text.clone()));
                let kind = v["type"]
                    .as_str()
                    .or(v["value"]["type"].as_str())
                    .unwrap_or("error")
                    .rsplit('.')
                    .next()
                    .unwrap_or("error")
                    .to_string();
                let err = Error::Fault {
                    method: format!("{method} {path}"),
                    name: kind,
                    message: format!("HTTP {status}: {text}"),
                };
                return Err(if status.as_u16() == 404 {
                    Error::NotFound(path.to_string())
                } else {
                    err
                });
            }
            if text.is_empty() {
                return Ok(Value::Null);
            }
            let v: Value = serde_json::from_str(&text).map_err(|e| Error::Protocol {
                method: format!("{method} {path}"),
                message: format!("not JSON: {e}"),
            })?;
            return Ok(v["value"].clone());
        }
        unreachable!("the loop returns on its second pass")
    }

    /// The id of the category named `name`.
    pub async fn category_id(&self, name: &str) -> Result<Option<String>, Error> {
        let ids = self
            .rest(reqwest::Method::GET, "/tagging/category", None)
            .await?;
        for id in ids
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            let c = self
                .rest(
                    reqwest::Method::GET,
                    &format!("/tagging/category/id:{id}"),
                    None,
                )
                .await?;
            if c["name"] == name {
                return Ok(Some(id.to_string()));
            }
        }
        Ok(None)
    }

    /// Creates a category (cardinality `SINGLE` or `MULTIPLE`) for VMs.
    pub async fn create_category(&self, name: &str, cardinality: &str) -> Result<String, Error> {
        let v = self
            .rest(
                reqwest::Method::POST,
                "/tagging/category",
                Some(json!({"create_spec": {"name": name, "description": "created by reflex", "cardinality": cardinality, "associable_types": []}})),
            )
            .await?;
        v.as_str()
            .map(str::to_string)
            .ok_or_else(|| Error::Protocol {
                method: "create category".into(),
                message: v.to_string(),
            })
    }

    /// Tags of a category: (id, name).
    pub async fn tags_in_category(
        &self,
        category_id: &str,
    ) -> Result<Vec<(String, String)>, Error> {
        let ids = self
            .rest(
                reqwest::Method::POST,
                &format!("/tagging/tag/id:{category_id}?~action=list-tags-for-category"),
                None,
            )
            .await?;
        let mut out = Vec::new();
        for id in ids
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            let t = self
                .rest(reqwest::Method::GET, &format!("/tagging/tag/id:{id}"), None)
                .await?;
            out.push((id.to_string(), t["name"].as_str().unwrap_or("").to_string()));
        }
        Ok(out)
    }

    /// Creates a tag in a category.
    pub async fn create_tag(&self, category_id: &str, name: &str) -> Result<String, Error> {
        let v = self
            .rest(
                reqwest::Method::POST,
                "/tagging/tag",
                Some(json!({"create_spec": {"name": name, "description": "created by reflex", "category_id": category_id}})),
            )
            .await?;
        v.as_str()
            .map(str::to_string)
            .ok_or_else(|| Error::Protocol {
                method: "create tag".into(),
                message: v.to_string(),
            })
    }

    /// Ids of the tags attached to an object.
    pub async fn attached_tags(&self, obj: &MoRef) -> Result<Vec<String>, Error> {
        let v = self
            .rest(
                reqwest::Method::POST,
                "/tagging/tag-association?~action=list-attached-tags",
                Some(json!({"object_id": {"id": obj.value, "type": obj.kind}})),
            )
            .await?;
        Ok(v.as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect())
    }

    async fn associate(&self, tag_id: &str, obj: &MoRef, action: &str) -> Result<(), Error> {
        self.rest(
            reqwest::Method::POST,
            &format!("/tagging/tag-association/id:{tag_id}?~action={action}"),
            Some(json!({"object_id": {"id": obj.value, "type": obj.kind}})),
        )
        .await?;
        Ok(())
    }

    async fn resolve_tag(
        &self,
        category: &str,
        tag: &str,
        create: bool,
    ) -> Result<(String, Vec<(String, String)>), Error> {
        let (cat, created) = match self.category_id(category).await? {
            Some(c) => (c, false),
            None if create => (self.create_category(category, "SINGLE").await?, true),
            None => return Err(Error::NotFound(format!("tag category `{category}`"))),
        };
        // A category made just now has no tags (and in a dry run it was not made).
        let tags = if created {
            Vec::new()
        } else {
            self.tags_in_category(&cat).await?
        };
        let id = match tags.iter().find(|(_, n)| n == tag) {
            Some((id, _)) => id.clone(),
            None if create => self.create_tag(&cat, tag).await?,
            None => {
                return Err(Error::NotFound(format!(
                    "tag `{tag}` in category `{category}`"
                )))
            }
        };
        Ok((id, tags))
    }

    /// Attaches `category`/`tag` to `obj`; with `replace`, first detaches the other tags of
    /// that category (a VM has one size at a time). `create` makes missing ones.
    pub async fn tag(
        &self,
        obj: &MoRef,
        category: &str,
        tag: &str,
        replace: bool,
        create: bool,
    ) -> Result<Change, Error> {
        let (id, siblings) = self.resolve_tag(category, tag, create).await?;
        let attached = self.attached_tags(obj).await?;
        let mut removed = Vec::new();
        if replace {
            for (sid, sname) in &siblings {
                if *sid != id && attached.contains(sid) {
                    self.associate(sid, obj, "detach").await?;
                    removed.push(sname.clone());
                }
            }
        }
        if attached.contains(&id) {
            if removed.is_empty() {
                return Ok(Change::AlreadySo(format!(
                    "{obj} is tagged {category}/{tag}"
                )));
            }
            return Ok(Change::Changed(format!(
                "{obj}: removed {removed:?} from {category}; {tag} already attached"
            )));
        }
        self.associate(&id, obj, "attach").await?;
        Ok(Change::Changed(if removed.is_empty() {
            format!("{obj}: attached {category}/{tag}")
        } else {
            format!("{obj}: attached {category}/{tag}, removed {removed:?}")
        }))
    }

    /// Detaches `category`/`tag` from `obj` if attached.
    pub async fn untag(&self, obj: &MoRef, category: &str, tag: &str) -> Result<Change, Error> {
        let (id, _) = match self.resolve_tag(category, tag, false).await {
            Ok(t) => t,
            Err(Error::NotFound(what)) => {
                return Ok(Change::AlreadySo(format!("{what} does not exist")))
            }
            Err(e) => return Err(e),
        };
        if !self.attached_tags(obj).await?.contains(&id) {
            return Ok(Change::AlreadySo(format!(
                "{obj} is not tagged {category}/{tag}"
            )));
        }
        self.associate(&id, obj, "detach").await?;
        Ok(Change::Changed(format!("{obj}: detached {category}/{tag}")))
    }

    /// Names of the tags attached to `obj` in `category` (for tests and templates).
    pub async fn tag_names(&self, obj: &MoRef, category: &str) -> Result<Vec<String>, Error> {
        let Some(cat) = self.category_id(category).await? else {
            return Ok(vec![]);
        };
        let attached = self.attached_tags(obj).await?;
        Ok(self
            .tags_in_category(&cat)
            .await?
            .into_iter()
            .filter(|(id, _)| attached.contains(id))
            .map(|(_, n)| n)
            .collect())
    }
}

impl Client {
    /// The tags attached to `obj`, by category name (names sorted).
    pub async fn tags_by_category(
        &self,
        obj: &MoRef,
    ) -> Result<std::collections::BTreeMap<String, Vec<String>>, Error> {
        let mut categories: std::collections::HashMap<String, String> = Default::default();
        let mut out: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for id in self.attached_tags(obj).await? {
            let t = self
                .rest(reqwest::Method::GET, &format!("/tagging/tag/id:{id}"), None)
                .await?;
            let cat_id = t["category_id"].as_str().unwrap_or("").to_string();
            let cat = match categories.get(&cat_id) {
                Some(n) => n.clone(),
                None => {
                    let c = self
                        .rest(
                            reqwest::Method::GET,
                            &format!("/tagging/category/id:{cat_id}"),
                            None,
                        )
                        .await?;
                    let n = c["name"].as_str().unwrap_or(&cat_id).to_string();
                    categories.insert(cat_id, n.clone());
                    n
                }
            };
            out.entry(cat)
                .or_default()
                .push(t["name"].as_str().unwrap_or("").to_string());
        }
        for v in out.values_mut() {
            v.sort();
        }
        Ok(out)
    }
}
