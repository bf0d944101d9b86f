package stripefake

import (
	"encoding/json"
	"errors"
	"html/template"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// routes registers the API, the hosted Checkout pages and the helper routes.
func (s *Server) routes() {
	s.handleAPI(KindCreateCustomer, append([]string{"payment_method"}, customerParams...), s.createCustomer)
	s.handleAPI(KindRetrieveCustomer, nil, s.retrieveCustomer)
	s.handleAPI(KindUpdateCustomer, append([]string{"metadata"}, customerParams...), s.updateCustomer)
	s.handleAPI(KindCreateCheckoutSession, checkoutParams, s.createSession)
	s.handleAPI(KindRetrieveCheckout, nil, s.retrieveSession)
	s.handleAPI(KindExpireCheckoutSession, nil, s.expireSession)
	s.handleAPI(KindRetrieveSetupIntent, nil, s.retrieveSI)
	s.handleAPI(KindRetrievePaymentMethod, nil, s.retrievePM)
	s.handleAPI(KindAttachPaymentMethod, []string{"customer"}, s.attachPM)
	s.handleAPI(KindDetachPaymentMethod, nil, s.detachPM)
	s.handleAPI(KindCreatePaymentIntent, paymentIntentParams, s.createPI)
	s.handleAPI(KindRetrievePaymentIntent, nil, s.retrievePI)
	s.handleAPI(KindSearchPaymentIntents, []string{"query", "limit", "page"}, s.searchPIs)
	s.handleAPI(KindCreateRefund, refundParams, s.createRefund)
	s.handleAPI(KindRetrieveRefund, nil, s.retrieveRefund)
	s.handleAPI(KindRetrieveEvent, nil, s.retrieveEvent)

	s.mux.HandleFunc("GET /c/pay/{id}", s.checkoutPage)
	s.mux.HandleFunc("POST /c/pay/{id}", s.checkoutSubmit)

	s.mux.HandleFunc("POST /_stripefake/checkout/{id}/complete", s.helperComplete)
	s.mux.HandleFunc("GET /_stripefake/summary", s.helperSummary)
	s.mux.HandleFunc("POST /_stripefake/webhook", s.helperWebhook)
	s.mux.HandleFunc("POST /_stripefake/faults", s.helperFaults)
	s.mux.HandleFunc("POST /_stripefake/faults/clear", func(w http.ResponseWriter, _ *http.Request) {
		s.ClearFaults()
		w.WriteHeader(http.StatusNoContent)
	})
	s.mux.HandleFunc("POST /_stripefake/rate_limit", s.helperRateLimit)
	s.mux.HandleFunc("POST /_stripefake/idempotency/expire", func(w http.ResponseWriter, _ *http.Request) {
		s.ExpireIdempotencyKeys()
		w.WriteHeader(http.StatusNoContent)
	})
	s.mux.HandleFunc("/", s.notFound)
}

var checkoutTmpl = template.Must(template.New("checkout").Parse(`<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>stripefake Checkout</title>
<style>body{font-family:sans-serif;max-width:36em;margin:2em auto}.error{color:#b00}</style></head>
<body>
<h1>{{if eq .Mode "setup"}}Save a card{{else}}Pay {{.Amount}}{{end}}</h1>
<p>Checkout Session <code>{{.ID}}</code> is <strong id="status">{{.Status}}</strong>.</p>
{{if .Error}}<p class="error" role="alert">{{.Error}}</p>{{end}}
{{if eq .Status "open"}}
<form method="post">
<fieldset><legend>Test card</legend>
{{range .Cards}}<label><input type="radio" name="payment_method" value="{{.}}"{{if eq . "pm_card_visa"}} checked{{end}}> {{.}}</label><br>
{{end}}</fieldset>
{{if .TermsRequired}}<p><label><input type="checkbox" name="accept_terms" value="on"> {{or .TermsMessage "I agree to the Terms of Service."}}</label></p>{{end}}
{{if .SubmitMessage}}<p>{{.SubmitMessage}}</p>{{end}}
<button type="submit">{{if eq .Mode "setup"}}Save card{{else}}Pay{{end}}</button>
</form>
{{if .CancelURL}}<p><a href="{{.CancelURL}}">Cancel</a></p>{{end}}
{{end}}
</body></html>
`))

type checkoutView struct {
	ID, Mode, Status, Amount, Error        string
	Cards                                  []string
	TermsRequired                          bool
	TermsMessage, SubmitMessage, CancelURL string
}

func (s *Server) renderCheckoutPage(w http.ResponseWriter, status int, id, errMsg string) {
	var evs []*event
	s.mu.Lock()
	cs := s.st.sessions[id]
	var v checkoutView
	if cs != nil {
		s.expireIfDueLocked(&evs, cs)
		v = checkoutView{
			ID: cs.id, Mode: cs.mode, Status: cs.status, Error: errMsg,
			Amount: formatAmount(cs.amountTotal, cs.currency), Cards: TestPaymentMethods(),
			TermsRequired: cs.tosRequired, TermsMessage: cs.tosMessage,
			SubmitMessage: cs.submitMessage, CancelURL: cs.cancelURL,
		}
	}
	s.mu.Unlock()
	s.hooks.enqueue(evs)
	if cs == nil {
		http.Error(w, "no such checkout session", http.StatusNotFound)
		return
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.WriteHeader(status)
	_ = checkoutTmpl.Execute(w, v)
}

// checkoutPage shows the hosted page with a choice of test cards.
func (s *Server) checkoutPage(w http.ResponseWriter, r *http.Request) {
	s.renderCheckoutPage(w, http.StatusOK, r.PathValue("id"), "")
}

// checkoutSubmit completes the session with the chosen card: 303 to the
// success URL, or the page again with the decline (402) or problem.
func (s *Server) checkoutSubmit(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	if err := r.ParseForm(); err != nil {
		s.renderCheckoutPage(w, http.StatusBadRequest, id, "The form could not be read.")
		return
	}
	out, err := s.completeSession(id, r.PostFormValue("payment_method"), r.PostFormValue("accept_terms") != "")
	var cardErr *CardError
	switch {
	case err == nil:
		if out.SuccessURL != nil {
			http.Redirect(w, r, strings.ReplaceAll(*out.SuccessURL, "{CHECKOUT_SESSION_ID}", id), http.StatusSeeOther)
			return
		}
		s.renderCheckoutPage(w, http.StatusOK, id, "")
	case errors.As(err, &cardErr):
		s.renderCheckoutPage(w, http.StatusPaymentRequired, id, cardErr.Message)
	case errors.Is(err, ErrNoSuchSession):
		http.Error(w, "no such checkout session", http.StatusNotFound)
	case errors.Is(err, ErrSessionNotOpen):
		s.renderCheckoutPage(w, http.StatusConflict, id, "This Checkout Session is no longer open.")
	case errors.Is(err, ErrTermsNotAccepted):
		s.renderCheckoutPage(w, http.StatusBadRequest, id, "Please accept the terms of service.")
	default:
		s.renderCheckoutPage(w, http.StatusBadRequest, id, "Please choose one of the test cards.")
	}
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

// helperComplete is CompleteCheckoutSession over HTTP, for processes that
// run the emulator elsewhere: form payment_method (default pm_card_visa).
func (s *Server) helperComplete(w http.ResponseWriter, r *http.Request) {
	pm := r.PostFormValue("payment_method")
	if pm == "" {
		pm = "pm_card_visa"
	}
	out, err := s.completeSession(r.PathValue("id"), pm, true)
	var cardErr *CardError
	switch {
	case err == nil:
		writeJSON(w, http.StatusOK, out)
	case errors.As(err, &cardErr):
		errorResponse(&apiError{status: http.StatusPaymentRequired, Type: errTypeCard, Code: cardErr.Code,
			DeclineCode: cardErr.DeclineCode, Message: cardErr.Message}).write(w)
	case errors.Is(err, ErrNoSuchSession):
		errorResponse(invalidRequest(http.StatusNotFound, "id", "resource_missing", "%v", err)).write(w)
	case errors.Is(err, ErrSessionNotOpen):
		errorResponse(invalidRequest(http.StatusConflict, "id", "checkout_session_unexpected_state", "%v", err)).write(w)
	default:
		errorResponse(badParam("payment_method", "", "%v", err)).write(w)
	}
}

type summaryJSON struct {
	RequestCounts     map[string]int64      `json:"request_counts"`
	Totals            map[string]totalsJSON `json:"totals"`
	SuccessfulCharges map[string]int        `json:"successful_charges"`
	PaymentIntents    int                   `json:"payment_intents"`
	Events            int                   `json:"events"`
	DeliveredEvents   int                   `json:"delivered_events"`
}

type totalsJSON struct {
	Collected int64 `json:"collected"`
	Refunded  int64 `json:"refunded"`
	Net       int64 `json:"net"`
}

// helperSummary reports the inspection figures as JSON.
func (s *Server) helperSummary(w http.ResponseWriter, _ *http.Request) {
	out := summaryJSON{
		RequestCounts: s.RequestCounts(), Totals: map[string]totalsJSON{},
		SuccessfulCharges: s.SuccessfulChargesByChargeID(),
		DeliveredEvents:   len(s.DeliveredEvents()),
	}
	for cur, t := range s.Totals() {
		out.Totals[cur] = totalsJSON{Collected: t.Collected, Refunded: t.Refunded, Net: t.Net()}
	}
	s.mu.Lock()
	out.PaymentIntents, out.Events = len(s.st.piList), len(s.st.eventList)
	s.mu.Unlock()
	writeJSON(w, http.StatusOK, out)
}

// helperWebhook is SetWebhook over HTTP: form url, secret.
func (s *Server) helperWebhook(w http.ResponseWriter, r *http.Request) {
	s.SetWebhook(r.PostFormValue("url"), r.PostFormValue("secret"))
	w.WriteHeader(http.StatusNoContent)
}

// helperFaults injects faults over HTTP: form kind, fault (none, 500_before,
// 500_after, drop_after), latency_ms, and either count (script the next
// count requests) or probability.
func (s *Server) helperFaults(w http.ResponseWriter, r *http.Request) {
	kind := r.PostFormValue("kind")
	if err := s.checkKind(kind); err != nil {
		errorResponse(badParam("kind", "", "%v", err)).write(w)
		return
	}
	f := Fault{Kind: FaultKind(r.PostFormValue("fault"))}
	if f.Kind == "none" {
		f.Kind = FaultNone
	}
	switch f.Kind {
	case FaultNone, Fault500Before, Fault500After, FaultDropAfter:
	default:
		errorResponse(badParam("fault", "", "fault must be one of none, 500_before, 500_after, drop_after")).write(w)
		return
	}
	if v := r.PostFormValue("latency_ms"); v != "" {
		ms, err := strconv.Atoi(v)
		if err != nil || ms < 0 {
			errorResponse(badParam("latency_ms", "", "latency_ms must be a non-negative integer")).write(w)
			return
		}
		f.Latency = time.Duration(ms) * time.Millisecond
	}
	if v := r.PostFormValue("probability"); v != "" {
		p, err := strconv.ParseFloat(v, 64)
		if err != nil || p < 0 || p > 1 {
			errorResponse(badParam("probability", "", "probability must be between 0 and 1")).write(w)
			return
		}
		s.SetFaultRate(kind, f, p)
		w.WriteHeader(http.StatusNoContent)
		return
	}
	n, err := strconv.Atoi(r.PostFormValue("count"))
	if err != nil || n < 1 {
		errorResponse(badParam("count", "", "give count (a positive integer) or probability")).write(w)
		return
	}
	s.InjectFaults(kind, n, f)
	w.WriteHeader(http.StatusNoContent)
}

// helperRateLimit is SetRateLimit over HTTP: form rps, burst.
func (s *Server) helperRateLimit(w http.ResponseWriter, r *http.Request) {
	rps, err := strconv.ParseFloat(r.PostFormValue("rps"), 64)
	if err != nil {
		errorResponse(badParam("rps", "", "rps must be a number")).write(w)
		return
	}
	burst, _ := strconv.Atoi(r.PostFormValue("burst"))
	s.SetRateLimit(rps, burst)
	w.WriteHeader(http.StatusNoContent)
}
