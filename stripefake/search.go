package stripefake

import (
	"fmt"
	"strconv"
	"strings"
)

// searchClause is one term of Stripe's search query language.
type searchClause struct {
	neg   bool
	field string // metadata, status, customer, currency, amount, created
	key   string // the metadata key
	op    string // : > < >= <=
	value string
}

// parseSearchQuery parses the subset of Stripe's search query language that
// PaymentIntent search needs: clauses joined by AND (OR is not supported),
// each optionally negated with '-': metadata['key']:'value',
// status:'succeeded', customer:'cus_...', currency:'usd', amount>1000,
// created>=1700000000.
func parseSearchQuery(q string) ([]searchClause, error) {
	var out []searchClause
	i := 0
	skip := func() {
		for i < len(q) && q[i] == ' ' {
			i++
		}
	}
	for {
		skip()
		if i >= len(q) {
			if len(out) == 0 {
				return nil, fmt.Errorf("the query is empty")
			}
			return nil, fmt.Errorf("the query ends after AND")
		}
		var c searchClause
		if q[i] == '-' {
			c.neg = true
			i++
		}
		start := i
		for i < len(q) && (q[i] >= 'a' && q[i] <= 'z' || q[i] == '_') {
			i++
		}
		c.field = q[start:i]
		switch c.field {
		case "metadata":
			if i >= len(q) || q[i] != '[' {
				return nil, fmt.Errorf("expected [ after metadata at %d", i)
			}
			i++
			key, n, err := quoted(q[i:])
			if err != nil {
				return nil, fmt.Errorf("metadata key at %d: %w", i, err)
			}
			i += n
			if i >= len(q) || q[i] != ']' {
				return nil, fmt.Errorf("expected ] at %d", i)
			}
			i++
			c.key = key
		case "status", "customer", "currency", "amount", "created":
		case "":
			return nil, fmt.Errorf("expected a field at %d", i)
		default:
			return nil, fmt.Errorf("field %q is not supported by stripefake", c.field)
		}
		for _, op := range []string{">=", "<=", ":", ">", "<"} {
			if strings.HasPrefix(q[i:], op) {
				c.op = op
				i += len(op)
				break
			}
		}
		if c.op == "" {
			return nil, fmt.Errorf("expected : after %s at %d", c.field, i)
		}
		if c.op != ":" && c.field != "amount" && c.field != "created" {
			return nil, fmt.Errorf("%s only supports the : operator", c.field)
		}
		if i < len(q) && (q[i] == '\'' || q[i] == '"') {
			v, n, err := quoted(q[i:])
			if err != nil {
				return nil, fmt.Errorf("value at %d: %w", i, err)
			}
			c.value = v
			i += n
		} else {
			start := i
			for i < len(q) && q[i] != ' ' {
				i++
			}
			c.value = q[start:i]
			if c.field != "amount" && c.field != "created" {
				return nil, fmt.Errorf("the value of %s must be quoted", c.field)
			}
		}
		if c.field == "amount" || c.field == "created" {
			if _, err := strconv.ParseInt(c.value, 10, 64); err != nil {
				return nil, fmt.Errorf("%s needs an integer, not %q", c.field, c.value)
			}
		}
		out = append(out, c)
		skip()
		if i >= len(q) {
			return out, nil
		}
		switch {
		case strings.HasPrefix(q[i:], "AND "):
			i += 4
		case strings.HasPrefix(q[i:], "OR "):
			return nil, fmt.Errorf("OR is not supported by stripefake")
		default:
			return nil, fmt.Errorf("expected AND at %d", i)
		}
	}
}

// quoted reads a '...' or "..." string with backslash escapes from the start
// of s, returning it and the bytes consumed.
func quoted(s string) (string, int, error) {
	if s == "" || s[0] != '\'' && s[0] != '"' {
		return "", 0, fmt.Errorf("expected a quoted string")
	}
	quote := s[0]
	var b strings.Builder
	for i := 1; i < len(s); i++ {
		switch s[i] {
		case '\\':
			if i+1 < len(s) {
				i++
				b.WriteByte(s[i])
			}
		case quote:
			return b.String(), i + 1, nil
		default:
			b.WriteByte(s[i])
		}
	}
	return "", 0, fmt.Errorf("unterminated string")
}

func (c searchClause) match(pi *paymentIntent) bool {
	var ok bool
	switch c.field {
	case "metadata":
		ok = pi.metadata[c.key] == c.value
	case "status":
		ok = pi.status == c.value
	case "customer":
		ok = pi.customer == c.value
	case "currency":
		ok = pi.currency == strings.ToLower(c.value)
	case "amount", "created":
		want, _ := strconv.ParseInt(c.value, 10, 64)
		have := pi.amount
		if c.field == "created" {
			have = pi.created
		}
		switch c.op {
		case ":":
			ok = have == want
		case ">":
			ok = have > want
		case "<":
			ok = have < want
		case ">=":
			ok = have >= want
		case "<=":
			ok = have <= want
		}
	}
	return ok != c.neg
}

type searchResultJSON struct {
	Object     string  `json:"object"`
	Data       []any   `json:"data"`
	HasMore    bool    `json:"has_more"`
	NextPage   *string `json:"next_page"`
	TotalCount *int    `json:"total_count,omitempty"`
	URL        string  `json:"url"`
}

func (s *Server) searchPIs(c *call) (any, *apiError) {
	p := c.p
	p.require("query")
	limit, hasLimit := p.int("limit")
	if p.err != nil {
		return nil, p.err
	}
	if !hasLimit {
		limit = 10
	}
	if limit < 1 || limit > 100 {
		return nil, badParam("limit", "", "Invalid limit: must be between 1 and 100")
	}
	offset := 0
	if page := p.str("page"); page != "" {
		n, err := strconv.Atoi(strings.TrimPrefix(page, "page_"))
		if err != nil || !strings.HasPrefix(page, "page_") || n < 0 {
			return nil, badParam("page", "", "Invalid page: %s", page)
		}
		offset = n
	}
	if aerr := c.exp.check("total_count", "data.payment_method", "data.customer", "data.latest_charge"); aerr != nil {
		return nil, aerr
	}
	clauses, err := parseSearchQuery(p.str("query"))
	if err != nil {
		return nil, badParam("query", "", "Invalid search query: %v", err)
	}

	s.mu.Lock()
	defer s.mu.Unlock()
	candidates := s.st.piList
	for _, cl := range clauses {
		if cl.field == "metadata" && !cl.neg {
			if idx := s.st.piByMeta[cl.key+"\x00"+cl.value]; len(idx) < len(candidates) {
				candidates = idx
			}
		}
	}
	visibleBefore := s.now().Add(-s.opts.searchLag)
	var hits []*paymentIntent
	for i := len(candidates) - 1; i >= 0; i-- { // newest first
		pi := candidates[i]
		if s.opts.searchLag > 0 && pi.createdAt.After(visibleBefore) {
			continue
		}
		all := true
		for _, cl := range clauses {
			if !cl.match(pi) {
				all = false
				break
			}
		}
		if all {
			hits = append(hits, pi)
		}
	}
	out := &searchResultJSON{Object: "search_result", Data: []any{}, URL: "/v1/payment_intents/search"}
	if c.exp["total_count"] {
		n := len(hits)
		out.TotalCount = &n
	}
	end := min(len(hits), offset+int(limit))
	for i := offset; i < end; i++ {
		out.Data = append(out.Data, s.renderPI(hits[i], c.exp.sub("data")))
	}
	if end < len(hits) {
		out.HasMore = true
		out.NextPage = nullable("page_" + strconv.Itoa(end))
	}
	return out, nil
}
