package stripefake

import (
	"net/http"
	"strings"
)

var customerParams = []string{
	"email", "name", "description", "phone", "metadata[*]", "payment_method",
	"invoice_settings[default_payment_method]",
}

func checkEmail(p *params, key string) {
	if v := p.str(key); v != "" && (!strings.Contains(v, "@") || strings.ContainsAny(v, " \t\r\n")) {
		p.fail(badParam(key, "email_invalid", "Invalid email address: %s", v))
	}
	p.maxLen(key, 512)
}

func (s *Server) createCustomer(c *call) (any, *apiError) {
	p := c.p
	checkEmail(p, "email")
	p.maxLen("name", 256)
	p.maxLen("description", 350)
	md := p.metadata("metadata")
	if p.err != nil {
		return nil, p.err
	}
	var evs []*event
	defer func() { s.hooks.enqueue(evs) }()
	s.mu.Lock()
	defer s.mu.Unlock()
	cu := &customer{
		id: newID("cus"), created: s.unix(), email: p.str("email"), name: p.str("name"),
		description: p.str("description"), phone: p.str("phone"), metadata: md,
	}
	var pm *paymentMethod
	if id := p.str("payment_method"); id != "" {
		var aerr *apiError
		if pm, aerr = s.resolvePMLocked(id, "payment_method", http.StatusBadRequest); aerr != nil {
			return nil, aerr
		}
		if aerr := s.checkAttachableLocked(pm, cu); aerr != nil {
			return nil, aerr
		}
	}
	if dpm := p.str("invoice_settings[default_payment_method]"); dpm != "" {
		if pm == nil || dpm != pm.id && dpm != pm.token {
			return nil, badParam("invoice_settings[default_payment_method]", "resource_missing",
				"The customer does not have a payment method with the ID %s. The payment method must be attached to the customer.", dpm)
		}
		cu.defaultPM = pm.id
	}
	s.st.customers[cu.id] = cu
	s.emitLocked(&evs, "customer.created", s.renderCustomer(cu, nil), c.origin())
	if pm != nil {
		s.attachLocked(&evs, pm, cu, c.origin())
	}
	return s.renderCustomer(cu, c.exp), nil
}

func (s *Server) retrieveCustomer(c *call) (any, *apiError) {
	if aerr := c.exp.check("invoice_settings.default_payment_method"); aerr != nil {
		return nil, aerr
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	id := c.r.PathValue("id")
	cu := s.st.customers[id]
	if cu == nil {
		return nil, noSuch(http.StatusNotFound, "id", "customer", id)
	}
	return s.renderCustomer(cu, c.exp), nil
}

func (s *Server) updateCustomer(c *call) (any, *apiError) {
	p := c.p
	checkEmail(p, "email")
	p.maxLen("name", 256)
	p.maxLen("description", 350)
	md := p.metadata("metadata")
	if p.err != nil {
		return nil, p.err
	}
	if p.has("payment_method") {
		return nil, unknownParam("payment_method")
	}
	var evs []*event
	defer func() { s.hooks.enqueue(evs) }()
	s.mu.Lock()
	defer s.mu.Unlock()
	id := c.r.PathValue("id")
	old := s.st.customers[id]
	if old == nil {
		return nil, noSuch(http.StatusNotFound, "id", "customer", id)
	}
	cu := *old
	for key, field := range map[string]*string{"email": &cu.email, "name": &cu.name, "description": &cu.description, "phone": &cu.phone} {
		if p.has(key) {
			*field = p.str(key)
		}
	}
	if p.has("metadata") && p.str("metadata") == "" {
		cu.metadata = map[string]string{}
	}
	if len(md) > 0 || anyPrefix(p, "metadata[") {
		merged := map[string]string{}
		for k, v := range old.metadata {
			merged[k] = v
		}
		for k := range p.vals {
			if mk, ok := strings.CutPrefix(k, "metadata["); ok {
				delete(merged, strings.TrimSuffix(mk, "]"))
			}
		}
		for k, v := range md {
			merged[k] = v
		}
		cu.metadata = merged
	}
	if p.has("invoice_settings[default_payment_method]") {
		dpm := p.str("invoice_settings[default_payment_method]")
		if dpm != "" {
			pm := s.st.pms[dpm]
			if pm == nil || pm.customer != cu.id {
				return nil, badParam("invoice_settings[default_payment_method]", "resource_missing",
					"The customer does not have a payment method with the ID %s. The payment method must be attached to the customer.", dpm)
			}
		}
		cu.defaultPM = dpm
	}
	s.st.customers[id] = &cu
	s.emitLocked(&evs, "customer.updated", s.renderCustomer(&cu, nil), c.origin())
	return s.renderCustomer(&cu, c.exp), nil
}

func anyPrefix(p *params, prefix string) bool {
	for k := range p.vals {
		if strings.HasPrefix(k, prefix) {
			return true
		}
	}
	return false
}
