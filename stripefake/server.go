package stripefake

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/stripe/stripe-go/v82"
)

// APIVersion is the Stripe API version stripefake speaks and stamps on its
// events: the one stripe-go v82 pins, so webhook.ConstructEvent accepts them.
const APIVersion = stripe.APIVersion

// Server is the emulator. It is safe for concurrent use; create it with [New]
// and stop it with [Server.Close].
type Server struct {
	opts options
	mux  *http.ServeMux

	// counts holds one counter per request kind; the map is fixed after New.
	counts map[string]*atomic.Int64

	// mu guards st. It is held only for map work, never across I/O or sleeps.
	mu sync.Mutex
	st state

	idem    *idempotencyStore
	faults  *faultTable
	limiter *rateLimiter
	hooks   *dispatcher

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	closed atomic.Bool
}

// state is everything Stripe would store.
type state struct {
	customers map[string]*customer
	pms       map[string]*paymentMethod
	pis       map[string]*paymentIntent
	charges   map[string]*charge
	sis       map[string]*setupIntent
	sessions  map[string]*session
	refunds   map[string]*refund
	events    map[string]*event
	eventList []*event

	// piList is every PaymentIntent in creation order; piByMeta and
	// sessionsByMeta index them by "key\x00value" of their metadata.
	piList         []*paymentIntent
	piByMeta       map[string][]*paymentIntent
	sessionsByMeta map[string][]*session
	openSessions   map[string]*session
}

type options struct {
	webhookURL    string
	webhookSecret string
	webhookEvents []string
	delivery      DeliveryOptions
	seed          uint64
	rps           float64
	burst         int
	now           func() time.Time
	idemTTL       time.Duration
	logger        *slog.Logger
	baseURL       string
	apiKeys       map[string]bool
	searchLag     time.Duration
	httpClient    *http.Client
	keepEvents    int
}

// Option configures a Server.
type Option func(*options)

// WithWebhook sets the endpoint events are delivered to and the signing
// secret (whsec_...). Without it events are stored but not delivered; see
// also [Server.SetWebhook].
func WithWebhook(url, secret string) Option {
	return func(o *options) { o.webhookURL, o.webhookSecret = url, secret }
}

// WithWebhookEvents limits delivery to the given event types, like a Stripe
// webhook endpoint's enabled_events. No types, or "*", means all.
func WithWebhookEvents(types ...string) Option {
	return func(o *options) { o.webhookEvents = types }
}

// WithDelivery tunes webhook delivery: retries, duplicates, reordering.
// Zero fields take their defaults.
func WithDelivery(d DeliveryOptions) Option {
	return func(o *options) { o.delivery = d }
}

// WithSeed seeds the random choices (probabilistic faults, duplicate
// deliveries), so a run can be repeated. The default seed is 1.
func WithSeed(seed uint64) Option {
	return func(o *options) { o.seed = seed }
}

// WithRateLimit answers 429 rate_limit above rps requests per second, with
// bursts up to burst, across all API requests (Stripe allows 100/s in live
// mode, 25/s in test mode). Zero rps, the default, means no limit.
func WithRateLimit(rps float64, burst int) Option {
	return func(o *options) { o.rps, o.burst = rps, burst }
}

// WithClock sets the clock used for created, expires_at, session expiry and
// idempotency-key age. Webhook signatures always use the real time, since
// the receiver checks them against its own clock.
func WithClock(now func() time.Time) Option {
	return func(o *options) { o.now = now }
}

// WithIdempotencyTTL sets how long a stored idempotent result is replayed
// (Stripe: at least 24 hours, the default).
func WithIdempotencyTTL(d time.Duration) Option {
	return func(o *options) { o.idemTTL = d }
}

// WithLogger sets the logger for delivery failures and faults; the default
// discards.
func WithLogger(l *slog.Logger) Option {
	return func(o *options) { o.logger = l }
}

// WithBaseURL sets the URL hosted Checkout pages are served under. By
// default it is taken from each API request (scheme and Host header), which
// is right for httptest servers and cmd/stripefake.
func WithBaseURL(u string) Option {
	return func(o *options) { o.baseURL = strings.TrimSuffix(u, "/") }
}

// WithAPIKeys restricts the accepted secret keys to the given ones. By
// default any test-mode key (sk_test_... or rk_test_...) is accepted.
func WithAPIKeys(keys ...string) Option {
	return func(o *options) {
		o.apiKeys = map[string]bool{}
		for _, k := range keys {
			o.apiKeys[k] = true
		}
	}
}

// WithSearchLag hides PaymentIntents younger than d from search, as Stripe's
// search index lags writes ("usually less than a minute"). Default 0.
func WithSearchLag(d time.Duration) Option {
	return func(o *options) { o.searchLag = d }
}

// WithEventRetention keeps only the newest n events (and the newest n
// records of deliveries), forgetting older ones, to bound memory in long
// benchmark runs. Stored objects are always kept. Default 0: keep all.
// Combine with [WithIdempotencyTTL] to bound the stored idempotent answers.
func WithEventRetention(n int) Option {
	return func(o *options) { o.keepEvents = n }
}

// WithHTTPClient sets the client used to deliver webhooks.
func WithHTTPClient(c *http.Client) Option {
	return func(o *options) { o.httpClient = c }
}

// New returns a Server with empty state. It starts webhook workers and an
// expiry sweeper; call Close to stop them.
func New(opts ...Option) *Server {
	o := options{seed: 1, now: time.Now, idemTTL: 24 * time.Hour}
	for _, opt := range opts {
		opt(&o)
	}
	if o.logger == nil {
		o.logger = slog.New(slog.DiscardHandler)
	}
	s := &Server{
		opts: o,
		mux:  http.NewServeMux(),
		st: state{
			customers: map[string]*customer{}, pms: map[string]*paymentMethod{},
			pis: map[string]*paymentIntent{}, charges: map[string]*charge{},
			sis: map[string]*setupIntent{}, sessions: map[string]*session{},
			refunds: map[string]*refund{}, events: map[string]*event{},
			piByMeta: map[string][]*paymentIntent{}, sessionsByMeta: map[string][]*session{},
			openSessions: map[string]*session{},
		},
		counts:  map[string]*atomic.Int64{},
		idem:    newIdempotencyStore(),
		faults:  newFaultTable(o.seed),
		limiter: &rateLimiter{},
	}
	s.limiter.set(o.rps, o.burst)
	s.ctx, s.cancel = context.WithCancel(context.Background())
	s.routes()
	s.hooks = newDispatcher(s)
	s.wg.Add(1)
	go s.sweep()
	return s
}

// Close stops webhook delivery (undelivered events are dropped) and the
// sweeper. The handler keeps answering API requests.
func (s *Server) Close() {
	if s.closed.Swap(true) {
		return
	}
	s.cancel()
	s.hooks.close()
	s.wg.Wait()
}

// ServeHTTP implements http.Handler.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s.mux.ServeHTTP(w, r)
}

func (s *Server) now() time.Time { return s.opts.now() }

func (s *Server) unix() int64 { return s.now().Unix() }

// sweep expires due Checkout Sessions and forgets old idempotency keys.
func (s *Server) sweep() {
	defer s.wg.Done()
	t := time.NewTicker(500 * time.Millisecond)
	defer t.Stop()
	for tick := 1; ; tick++ {
		select {
		case <-s.ctx.Done():
			return
		case <-t.C:
			s.SweepExpiredSessions()
			// Old keys only cost memory: walk them every 10 s, not every tick.
			if tick%20 == 0 {
				s.idem.purge(s.now(), s.opts.idemTTL)
			}
		}
	}
}

// call is one API request as a handler sees it.
type call struct {
	r       *http.Request
	p       *params
	exp     expandSet
	reqID   string
	idemKey string
	baseURL string
}

func (c *call) origin() origin {
	return origin{reqID: c.reqID, idemKey: c.idemKey}
}

// apiFunc handles one API route. It returns the object to encode or an error.
type apiFunc func(c *call) (any, *apiError)

// handleAPI registers an authenticated, rate-limited, fault-injectable,
// idempotent API route. kind is the ServeMux pattern ("POST /v1/payment_intents"),
// which is also the name faults and counts use.
func (s *Server) handleAPI(kind string, allowed []string, h apiFunc) {
	set := map[string]bool{"expand[#]": true}
	for _, a := range allowed {
		set[a] = true
	}
	s.counts[kind] = &atomic.Int64{}
	s.mux.HandleFunc(kind, func(w http.ResponseWriter, r *http.Request) {
		s.serveAPI(w, r, kind, set, h)
	})
}

func (s *Server) serveAPI(w http.ResponseWriter, r *http.Request, kind string, allowed map[string]bool, h apiFunc) {
	s.counts[kind].Add(1)
	reqID := newID("req")
	hdr := w.Header()
	hdr.Set("Request-Id", reqID)
	hdr.Set("Stripe-Version", APIVersion)

	apiKey, aerr := s.authenticate(r)
	if aerr != nil {
		errorResponse(aerr).write(w)
		return
	}
	if !s.limiter.allow(time.Now()) {
		errorResponse(invalidRequest(http.StatusTooManyRequests, "", "rate_limit",
			"Request rate limit exceeded. You can learn more about rate limits here https://stripe.com/docs/rate-limits.")).write(w)
		return
	}
	raw, err := readForm(r)
	if err != nil {
		errorResponse(badParam("", "", "Invalid request body: %v", err)).write(w)
		return
	}
	p, aerr := parseParams(raw)
	if aerr != nil {
		errorResponse(aerr).write(w)
		return
	}
	fault := s.faults.next(kind)

	var entry *idemEntry
	idemKey := strings.TrimSpace(r.Header.Get("Idempotency-Key"))
	if r.Method == http.MethodPost && idemKey != "" {
		hdr.Set("Idempotency-Key", idemKey)
		if len(idemKey) > 255 {
			errorResponse(badParam("", "", "Idempotency-Key must be at most 255 characters long.")).write(w)
			return
		}
		var replay *idemEntry
		entry, replay, aerr = s.idem.begin(apiKey, idemKey, fingerprint(r.Method, r.URL.Path, p), s.now(), s.opts.idemTTL)
		if aerr != nil {
			resp := errorResponse(aerr)
			if aerr.status == http.StatusConflict {
				resp.shouldRetry = "true"
			}
			resp.write(w)
			return
		}
		if replay != nil {
			hdr.Set("Idempotent-Replayed", "true")
			hdr.Set("Original-Request", replay.requestID)
			replay.resp.write(w)
			return
		}
		entry.requestID = reqID
		// Whatever happens below, a reservation that was not completed is
		// released, so the key can be used again.
		defer s.idem.abandon(entry)
	}
	if entry == nil {
		entry = &idemEntry{} // completing it stores nothing
	}

	if fault.Latency > 0 {
		t := time.NewTimer(fault.Latency)
		select {
		case <-t.C:
		case <-r.Context().Done():
			t.Stop()
			return
		}
	}
	if aerr := p.checkKnown(allowed); aerr != nil {
		errorResponse(aerr).write(w)
		return
	}
	exp := p.expand()

	if fault.Kind == Fault500Before {
		resp := s.faultResponse(idemKey)
		s.idem.complete(entry, resp)
		resp.write(w)
		return
	}

	c := &call{r: r, p: p, exp: exp, reqID: reqID, idemKey: idemKey, baseURL: s.baseURL(r)}
	obj, aerr := h(c)
	var resp *response
	if aerr != nil {
		resp = errorResponse(aerr)
	} else {
		resp = jsonResponse(obj)
	}

	switch fault.Kind {
	case Fault500After:
		resp = s.faultResponse(idemKey)
		s.idem.complete(entry, resp)
		resp.write(w)
	case FaultDropAfter:
		s.idem.complete(entry, resp)
		dropConnection(w)
	default:
		s.idem.complete(entry, resp)
		resp.write(w)
	}
}

// faultResponse is an injected 500. Stripe marks a 500 stored under an
// idempotency key as not worth retrying: the retry would replay it.
func (s *Server) faultResponse(idemKey string) *response {
	resp := errorResponse(internalError())
	resp.shouldRetry = "true"
	if idemKey != "" {
		resp.shouldRetry = "false"
	}
	return resp
}

// dropConnection closes the client's connection without an answer.
func dropConnection(w http.ResponseWriter) {
	if hj, ok := w.(http.Hijacker); ok {
		if conn, _, err := hj.Hijack(); err == nil {
			_ = conn.Close()
			return
		}
	}
	panic(http.ErrAbortHandler)
}

// readForm reads the parameters: the body of a POST, the query otherwise.
func readForm(r *http.Request) (url.Values, error) {
	if r.Method != http.MethodPost {
		return r.URL.Query(), nil
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, 1<<20))
	if err != nil {
		return nil, err
	}
	return url.ParseQuery(string(body))
}

// authenticate returns the request's secret key, accepting Bearer and Basic
// authorization as Stripe does.
func (s *Server) authenticate(r *http.Request) (string, *apiError) {
	var key string
	auth := r.Header.Get("Authorization")
	if bearer, ok := strings.CutPrefix(auth, "Bearer "); ok {
		key = strings.TrimSpace(bearer)
	} else if user, _, ok := r.BasicAuth(); ok {
		key = user
	}
	if key == "" {
		return "", invalidRequest(http.StatusUnauthorized, "", "",
			"You did not provide an API key. You need to provide your API key in the Authorization header, using Bearer auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY').")
	}
	ok := (strings.HasPrefix(key, "sk_test_") || strings.HasPrefix(key, "rk_test_")) && len(key) > len("sk_test_")
	if s.opts.apiKeys != nil {
		ok = s.opts.apiKeys[key]
	}
	if !ok {
		return "", invalidRequest(http.StatusUnauthorized, "", "api_key_invalid",
			"Invalid API Key provided: %s (stripefake accepts test-mode secret keys only)", redactKey(key))
	}
	return key, nil
}

// redactKey shows a key the way Stripe's errors do: prefix and last four.
func redactKey(k string) string {
	if len(k) <= 12 {
		return strings.Repeat("*", len(k))
	}
	return k[:8] + strings.Repeat("*", len(k)-12) + k[len(k)-4:]
}

// baseURL is where this server's hosted pages live.
func (s *Server) baseURL(r *http.Request) string {
	if s.opts.baseURL != "" {
		return s.opts.baseURL
	}
	scheme := "http"
	if r.TLS != nil {
		scheme = "https"
	}
	return scheme + "://" + r.Host
}

const idAlphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

// newID returns a Stripe-looking id: prefix, underscore, 24 random characters.
func newID(prefix string) string {
	return newIDLen(prefix, 24)
}

func newIDLen(prefix string, n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		panic(fmt.Sprintf("stripefake: random id: %v", err))
	}
	for i := range b {
		b[i] = idAlphabet[int(b[i])%len(idAlphabet)]
	}
	return prefix + "_" + string(b)
}

// notFound answers unknown URLs the way Stripe does.
func (s *Server) notFound(w http.ResponseWriter, r *http.Request) {
	errorResponse(invalidRequest(http.StatusNotFound, "", "",
		"Unrecognized request URL (%s: %s). Please see https://stripe.com/docs or we can help at https://support.stripe.com/.", r.Method, r.URL.Path)).write(w)
}

var errUnknownKind = errors.New("stripefake: unknown request kind")

// checkKind reports whether kind names an API route ("*" names all).
func (s *Server) checkKind(kind string) error {
	if kind == "*" {
		return nil
	}
	if _, ok := s.counts[kind]; !ok {
		return fmt.Errorf("%w %q (want one of the Kind* constants, e.g. %q)", errUnknownKind, kind, KindCreatePaymentIntent)
	}
	return nil
}
