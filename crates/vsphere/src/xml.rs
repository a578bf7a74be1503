//! A small XML tree for SOAP bodies, parsed and written with quick-xml (namespaces resolved,
//! escaping done by the library). vSphere types values with `xsi:type`; the simulator uses
//! a locally declared prefix for the same namespace, so the attribute is found by namespace,
//! never by its prefix.

use quick_xml::events::{BytesEnd, BytesStart, BytesText, Event};
use quick_xml::name::ResolveResult;
use quick_xml::reader::NsReader;
use quick_xml::writer::Writer;

const XSI: &str = "http://www.w3.org/2001/XMLSchema-instance";

/// An element: local name, `xsi:type` (without prefix), `type` attribute (managed object
/// references), text and children.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Node {
    /// Local name.
    pub name: String,
    /// The value of `xsi:type`, prefix removed.
    pub xsi_type: Option<String>,
    /// The plain `type` attribute (the kind of a ManagedObjectReference).
    pub type_attr: Option<String>,
    /// Text content (unescaped).
    pub text: String,
    /// Child elements in order.
    pub children: Vec<Node>,
}

/// The XML could not be read.
#[derive(Debug, thiserror::Error)]
#[error("invalid XML at byte {position}: {message}")]
pub struct XmlError {
    /// Byte offset.
    pub position: u64,
    /// What is wrong.
    pub message: String,
}

impl Node {
    /// A new element.
    pub fn new(name: impl Into<String>) -> Node {
        Node {
            name: name.into(),
            ..Default::default()
        }
    }

    /// An element with text.
    pub fn text(name: impl Into<String>, text: impl Into<String>) -> Node {
        Node {
            name: name.into(),
            text: text.into(),
            ..Default::default()
        }
    }

    /// A managed object reference element (`<name type="Kind">value</name>`).
    pub fn moref(name: impl Into<String>, kind: &str, value: &str) -> Node {
        Node {
            name: name.into(),
            type_attr: Some(kind.into()),
            text: value.into(),
            ..Default::default()
        }
    }

    /// Sets `xsi:type`.
    pub fn typed(mut self, xsi_type: &str) -> Node {
        self.xsi_type = Some(xsi_type.into());
        self
    }

    /// Appends a child.
    pub fn with(mut self, child: Node) -> Node {
        self.children.push(child);
        self
    }

    /// The first child with this name.
    pub fn child(&self, name: &str) -> Option<&Node> {
        self.children.iter().find(|c| c.name == name)
    }

    /// The first child with this name, mutable.
    pub fn child_mut(&mut self, name: &str) -> Option<&mut Node> {
        self.children.iter_mut().find(|c| c.name == name)
    }

    /// All children with this name.
    pub fn children_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Node> + 'a {
        self.children.iter().filter(move |c| c.name == name)
    }

    /// Follows a path of child names.
    pub fn path(&self, path: &[&str]) -> Option<&Node> {
        let mut n = self;
        for p in path {
            n = n.child(p)?;
        }
        Some(n)
    }

    /// The text of a child, if present.
    pub fn child_text(&self, name: &str) -> Option<&str> {
        self.child(name).map(|c| c.text.as_str())
    }

    /// Sets (or adds) a child's text.
    pub fn set_child_text(&mut self, name: &str, text: &str) {
        match self.child_mut(name) {
            Some(c) => c.text = text.to_string(),
            None => self.children.push(Node::text(name, text)),
        }
    }

    /// Parses a document and returns its root element.
    pub fn parse(xml: &str) -> Result<Node, XmlError> {
        let mut reader = NsReader::from_str(xml);
        let mut stack: Vec<Node> = Vec::new();
        let err = |r: &NsReader<&[u8]>, m: String| XmlError {
            position: r.buffer_position(),
            message: m,
        };
        loop {
            let pos = reader.buffer_position();
            let event = match reader.read_resolved_event() {
                Ok((_, ev)) => ev,
                Err(e) => {
                    return Err(XmlError {
                        position: pos,
                        message: e.to_string(),
                    })
                }
            };
            match event {
                Event::Start(e) => {
                    let node = start_node(&reader, &e).map_err(|m| err(&reader, m))?;
                    stack.push(node);
                }
                Event::Empty(e) => {
                    let node = start_node(&reader, &e).map_err(|m| err(&reader, m))?;
                    match stack.last_mut() {
                        Some(parent) => parent.children.push(node),
                        None => return Ok(node),
                    }
                }
                Event::End(_) => {
                    let node = stack
                        .pop()
                        .ok_or_else(|| err(&reader, "unbalanced end tag".into()))?;
                    match stack.last_mut() {
                        Some(parent) => parent.children.push(node),
                        None => return Ok(node),
                    }
                }
                Event::Text(t) => {
                    if let Some(n) = stack.last_mut() {
                        n.text.push_str(&t.xml10_content());
                    }
                }
                Event::CData(t) => {
                    if let Some(n) = stack.last_mut() {
                        n.text.push_str(&t.into_inner());
                    }
                }
                Event::GeneralRef(r) => {
                    let resolved = if r.is_char_ref() {
                        r.resolve_char_ref().ok().flatten().map(String::from)
                    } else {
                        quick_xml::escape::resolve_predefined_entity(&r).map(String::from)
                    };
                    let s = resolved
                        .ok_or_else(|| err(&reader, format!("unknown entity &{};", &*r)))?;
                    if let Some(n) = stack.last_mut() {
                        n.text.push_str(&s);
                    }
                }
                Event::Eof => return Err(err(&reader, "unexpected end of document".into())),
                _ => {}
            }
        }
    }

    /// Writes the element (and its children) as XML; `xsi:type` uses the `xsi` prefix,
    /// which the envelope declares.
    pub fn write_to(&self, w: &mut Writer<Vec<u8>>) -> std::io::Result<()> {
        let mut start = BytesStart::new(self.name.as_str());
        if let Some(t) = &self.type_attr {
            start.push_attribute(("type", t.as_str()));
        }
        if let Some(t) = &self.xsi_type {
            start.push_attribute(("xsi:type", t.as_str()));
        }
        w.write_event(Event::Start(start))?;
        if !self.text.is_empty() {
            w.write_event(Event::Text(BytesText::new(&self.text)))?;
        }
        for c in &self.children {
            c.write_to(w)?;
        }
        w.write_event(Event::End(BytesEnd::new(self.name.as_str())))
    }
}

fn start_node(reader: &NsReader<&[u8]>, e: &BytesStart<'_>) -> Result<Node, String> {
    let mut node = Node::new(e.local_name().as_ref().to_string());
    for a in e.attributes() {
        let a = a.map_err(|e| e.to_string())?;
        let (ns, local) = reader.resolver().resolve_attribute(a.key);
        let value = a
            .normalized_value(quick_xml::XmlVersion::Implicit1_0)
            .map_err(|e| e.to_string())?
            .into_owned();
        match (ns, local.as_ref()) {
            (ResolveResult::Bound(n), "type") if n.as_ref() == XSI => {
                let v = value.rsplit(':').next().unwrap_or(&value).to_string();
                node.xsi_type = Some(v);
            }
            (ResolveResult::Unbound, "type") => node.type_attr = Some(value),
            _ => {}
        }
    }
    Ok(node)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_xsi_type_by_namespace_and_unescapes() {
        let xml = r#"<a xmlns:X="http://www.w3.org/2001/XMLSchema-instance" xmlns:other="urn:x"><b X:type="ArrayOfVirtualDevice" other:type="no">t &amp; &lt;u&gt; &#65;</b><c type="VirtualMachine">vm-1</c><d/></a>"#;
        let n = Node::parse(xml).unwrap();
        let b = n.child("b").unwrap();
        assert_eq!(b.xsi_type.as_deref(), Some("ArrayOfVirtualDevice"));
        assert_eq!(b.type_attr, None);
        assert_eq!(b.text, "t & <u> A");
        assert_eq!(
            n.child("c").unwrap().type_attr.as_deref(),
            Some("VirtualMachine")
        );
        assert!(n.child("d").is_some());
    }

    #[test]
    fn writes_with_escaping() {
        let n = Node::new("spec")
            .with(Node::text("name", "a<b>&\"c\""))
            .with(Node::moref("obj", "VirtualMachine", "vm-1").typed("X"));
        let mut w = Writer::new(Vec::new());
        n.write_to(&mut w).unwrap();
        let s = String::from_utf8(w.into_inner()).unwrap();
        assert!(s.contains("a&lt;b&gt;&amp;"), "{s}");
        let back = Node::parse(&format!(
            r#"<r xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">{s}</r>"#
        ))
        .unwrap();
        assert_eq!(
            back.child("spec").unwrap().child_text("name"),
            Some("a<b>&\"c\"")
        );
    }

    #[test]
    fn rejects_broken_xml() {
        assert!(Node::parse("<a><b></a>").is_err());
        assert!(Node::parse("<a>").is_err());
    }
}
