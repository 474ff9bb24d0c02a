"""The web portal and JSON API of the city lab and its startups (``pilotlab serve``;
docs/portal.md): the people-facing read side. It reads through the query layer
(``storage.portal_queries``) inside ``storage.access.scoped``: the database decides who sees what."""
