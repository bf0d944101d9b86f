package stripefake

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"slices"
	"strconv"
	"sync"
	"time"
)

// event is a stored event; payload is its JSON, as retrieved and delivered.
type event struct {
	id      string
	typ     string
	created int64
	payload []byte
}

// origin is the API request that caused an event (empty for customer actions).
type origin struct {
	reqID   string
	idemKey string
}

// jsonStringOrNull encodes s as a JSON string, or null when empty.
func jsonStringOrNull(s string) string {
	if s == "" {
		return "null"
	}
	b, _ := json.Marshal(s)
	return string(b)
}

// emitLocked records an event whose data.object is obj as it is now. The
// caller holds s.mu and queues the returned events for delivery after
// unlocking (see [dispatcher.enqueue]).
func (s *Server) emitLocked(evs *[]*event, typ string, obj any, o origin) {
	data, err := json.Marshal(obj)
	if err != nil {
		panic(fmt.Sprintf("stripefake: encode event object: %v", err))
	}
	ev := &event{id: newID("evt"), typ: typ, created: s.unix()}
	pending := 0
	if s.hooks.wants(typ) {
		pending = 1
	}
	// The envelope is spliced around data rather than encoded with it, so
	// the object is not validated and compacted a second time.
	var b bytes.Buffer
	b.Grow(len(data) + 256)
	fmt.Fprintf(&b, `{"id":"%s","object":"event","api_version":"%s","created":%d,"data":{"object":`, ev.id, APIVersion, ev.created)
	b.Write(data)
	fmt.Fprintf(&b, `},"livemode":false,"pending_webhooks":%d,"request":{"id":%s,"idempotency_key":%s},"type":"%s"}`,
		pending, jsonStringOrNull(o.reqID), jsonStringOrNull(o.idemKey), typ)
	payload := b.Bytes()
	ev.payload = payload
	s.st.events[ev.id] = ev
	s.st.eventList = append(s.st.eventList, ev)
	if keep := s.opts.keepEvents; keep > 0 && len(s.st.eventList) > keep {
		for _, old := range s.st.eventList[:len(s.st.eventList)-keep] {
			delete(s.st.events, old.id)
		}
		s.st.eventList = trimTo(s.st.eventList, keep)
	}
	*evs = append(*evs, ev)
}

// trimTo keeps the last n elements, copying them to a fresh array so the
// dropped ones can be collected.
func trimTo[T any](list []T, n int) []T {
	if len(list) <= n {
		return list
	}
	return append(make([]T, 0, n+n/2), list[len(list)-n:]...)
}

// DeliveryOptions tunes webhook delivery. Zero fields take the defaults.
type DeliveryOptions struct {
	// Workers is how many deliveries run at once (default 4). Like Stripe,
	// stripefake does not promise order; use 1 for a predictable one.
	Workers int
	// MaxAttempts bounds the attempts per event, the first included
	// (default 8). An event that never gets a 2xx is given up.
	MaxAttempts int
	// Backoff is the delay before the first retry, doubled for each next one
	// (default 50ms), up to MaxBackoff (default 2s).
	Backoff    time.Duration
	MaxBackoff time.Duration
	// Timeout bounds one attempt (default 10s).
	Timeout time.Duration
	// DuplicateProbability is the chance that an event is delivered twice
	// (each delivery signed and retried on its own), as Stripe may.
	DuplicateProbability float64
	// ReorderWindow, when positive, holds new events for this long and then
	// delivers the batch newest first, so receivers see them out of order.
	ReorderWindow time.Duration
}

func (o DeliveryOptions) withDefaults() DeliveryOptions {
	if o.Workers <= 0 {
		o.Workers = 4
	}
	if o.MaxAttempts <= 0 {
		o.MaxAttempts = 8
	}
	if o.Backoff <= 0 {
		o.Backoff = 50 * time.Millisecond
	}
	if o.MaxBackoff <= 0 {
		o.MaxBackoff = 2 * time.Second
	}
	if o.Timeout <= 0 {
		o.Timeout = 10 * time.Second
	}
	return o
}

// Delivery records one delivery attempt.
type Delivery struct {
	EventID   string
	EventType string
	// Attempt counts from 1 for each delivery of the event.
	Attempt int
	// Duplicate marks the extra delivery of a duplicated event.
	Duplicate bool
	// StatusCode is the receiver's HTTP status, 0 if there was none.
	StatusCode int
	// Err is the transport error, if any.
	Err string
	// OK is true when the receiver answered 2xx.
	OK bool
	At time.Time
}

// Event is a stored event as tests see it.
type Event struct {
	ID      string
	Type    string
	Created time.Time
	// Payload is the event's JSON exactly as delivered; decode it with
	// encoding/json into a stripe.Event.
	Payload []byte
}

func (ev *event) export() Event {
	return Event{ID: ev.id, Type: ev.typ, Created: time.Unix(ev.created, 0), Payload: ev.payload}
}

type delivery struct {
	ev      *event
	attempt int
	dup     bool
}

// dispatcher delivers events to the webhook endpoint.
type dispatcher struct {
	s      *Server
	opts   DeliveryOptions
	client *http.Client
	wake   chan struct{}

	mu         sync.Mutex
	url        string
	secret     string
	types      map[string]bool // nil: all
	rng        *rand.Rand
	queue      []*delivery
	batch      []*delivery
	batchTimer *time.Timer
	pending    int
	idle       chan struct{} // closed when pending drops to 0
	delivered  []*event
	log        []Delivery
	closed     bool
}

func newDispatcher(s *Server) *dispatcher {
	o := s.opts
	d := &dispatcher{
		s: s, opts: o.delivery.withDefaults(), client: o.httpClient,
		wake: make(chan struct{}, 1), url: o.webhookURL, secret: o.webhookSecret,
		rng: rand.New(rand.NewPCG(o.seed, o.seed^0xde11)),
	}
	if d.client == nil {
		d.client = &http.Client{}
	}
	if len(o.webhookEvents) > 0 && !slices.Contains(o.webhookEvents, "*") {
		d.types = setOf(o.webhookEvents...)
	}
	for range d.opts.Workers {
		s.wg.Add(1)
		go d.work()
	}
	return d
}

// wants reports whether an event of typ would be delivered now.
func (d *dispatcher) wants(typ string) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.url != "" && !d.closed && (d.types == nil || d.types[typ])
}

// enqueue queues events for delivery to the endpoint configured now.
func (d *dispatcher) enqueue(evs []*event) {
	if len(evs) == 0 {
		return
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed || d.url == "" {
		return
	}
	for _, ev := range evs {
		if d.types != nil && !d.types[ev.typ] {
			continue
		}
		n := 1
		if p := d.opts.DuplicateProbability; p > 0 && d.rng.Float64() < p {
			n = 2
		}
		for i := range n {
			dl := &delivery{ev: ev, dup: i == 1}
			if d.pending == 0 {
				d.idle = make(chan struct{})
			}
			d.pending++
			if d.opts.ReorderWindow > 0 {
				d.batch = append(d.batch, dl)
			} else {
				d.queue = append(d.queue, dl)
			}
		}
	}
	if d.opts.ReorderWindow > 0 && len(d.batch) > 0 && d.batchTimer == nil {
		d.batchTimer = time.AfterFunc(d.opts.ReorderWindow, d.flushBatch)
	}
	d.signal()
}

// flushBatch moves the held batch to the queue, newest first.
func (d *dispatcher) flushBatch() {
	d.mu.Lock()
	b := d.batch
	d.batch, d.batchTimer = nil, nil
	if !d.closed {
		slices.Reverse(b)
		d.queue = append(d.queue, b...)
	}
	d.mu.Unlock()
	d.signal()
}

func (d *dispatcher) signal() {
	select {
	case d.wake <- struct{}{}:
	default:
	}
}

func (d *dispatcher) work() {
	defer d.s.wg.Done()
	for {
		d.mu.Lock()
		if len(d.queue) > 0 && !d.closed {
			dl := d.queue[0]
			d.queue = d.queue[1:]
			more := len(d.queue) > 0
			d.mu.Unlock()
			if more {
				d.signal()
			}
			d.attempt(dl)
			continue
		}
		d.mu.Unlock()
		select {
		case <-d.wake:
		case <-d.s.ctx.Done():
			return
		}
	}
}

// sign computes Stripe's signature header for payload at t.
func sign(secret string, t time.Time, payload []byte) string {
	mac := hmac.New(sha256.New, []byte(secret))
	mac.Write([]byte(strconv.FormatInt(t.Unix(), 10)))
	mac.Write([]byte("."))
	mac.Write(payload)
	return "t=" + strconv.FormatInt(t.Unix(), 10) + ",v1=" + hex.EncodeToString(mac.Sum(nil))
}

func (d *dispatcher) attempt(dl *delivery) {
	d.mu.Lock()
	url, secret := d.url, d.secret
	d.mu.Unlock()
	if url == "" {
		d.finish(dl, false) // the endpoint was removed
		return
	}
	dl.attempt++
	now := time.Now()
	rec := Delivery{EventID: dl.ev.id, EventType: dl.ev.typ, Attempt: dl.attempt, Duplicate: dl.dup, At: now}

	ctx, cancel := context.WithTimeout(d.s.ctx, d.opts.Timeout)
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(dl.ev.payload))
	if err == nil {
		req.Header.Set("Content-Type", "application/json; charset=utf-8")
		req.Header.Set("User-Agent", "Stripe/1.0 (+https://stripe.com/docs/webhooks)")
		req.Header.Set("Stripe-Signature", sign(secret, now, dl.ev.payload))
		var resp *http.Response
		resp, err = d.client.Do(req)
		if err == nil {
			_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<16))
			_ = resp.Body.Close()
			rec.StatusCode = resp.StatusCode
		}
	}
	cancel()
	if err != nil {
		rec.Err = err.Error()
	}
	rec.OK = err == nil && rec.StatusCode/100 == 2
	d.mu.Lock()
	d.log = append(d.log, rec)
	if keep := d.s.opts.keepEvents; keep > 0 && len(d.log) > 2*keep {
		d.log = trimTo(d.log, keep)
	}
	d.mu.Unlock()

	switch {
	case rec.OK:
		d.finish(dl, true)
	case d.s.ctx.Err() != nil:
		// Closing: the delivery is dropped with the rest.
	case dl.attempt >= d.opts.MaxAttempts:
		d.s.opts.logger.Warn("stripefake webhook delivery gave up",
			"event_id", dl.ev.id, "event_type", dl.ev.typ, "attempts", dl.attempt,
			"status", rec.StatusCode, "error", rec.Err)
		d.finish(dl, false)
	default:
		backoff := min(d.opts.MaxBackoff, d.opts.Backoff<<(dl.attempt-1))
		d.s.opts.logger.Debug("stripefake webhook delivery failed",
			"event_id", dl.ev.id, "attempt", dl.attempt, "status", rec.StatusCode,
			"error", rec.Err, "retry_in", backoff)
		time.AfterFunc(backoff, func() { d.retry(dl) })
	}
}

func (d *dispatcher) retry(dl *delivery) {
	d.mu.Lock()
	if !d.closed {
		d.queue = append(d.queue, dl)
	}
	d.mu.Unlock()
	d.signal()
}

func (d *dispatcher) finish(dl *delivery, ok bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return
	}
	if ok {
		d.delivered = append(d.delivered, dl.ev)
		if keep := d.s.opts.keepEvents; keep > 0 && len(d.delivered) > 2*keep {
			d.delivered = trimTo(d.delivered, keep)
		}
	}
	d.pending--
	if d.pending == 0 && d.idle != nil {
		close(d.idle)
		d.idle = nil
	}
}

func (d *dispatcher) close() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.closed = true
	if d.batchTimer != nil {
		d.batchTimer.Stop()
	}
	d.queue, d.batch, d.pending = nil, nil, 0
	if d.idle != nil {
		close(d.idle)
		d.idle = nil
	}
}

// SetWebhook sets (or, with an empty url, removes) the webhook endpoint and
// its signing secret. Events created from now on are delivered to it;
// deliveries already queued go to the new endpoint on their next attempt.
// A receiver that starts later is fine: failed attempts are retried.
func (s *Server) SetWebhook(url, secret string) {
	s.hooks.mu.Lock()
	defer s.hooks.mu.Unlock()
	s.hooks.url, s.hooks.secret = url, secret
}

// WaitForDeliveries blocks until every queued delivery has succeeded or
// been given up (including retries waiting for their backoff), or ctx ends.
func (s *Server) WaitForDeliveries(ctx context.Context) error {
	for {
		s.hooks.mu.Lock()
		if s.hooks.pending == 0 {
			s.hooks.mu.Unlock()
			return nil
		}
		idle := s.hooks.idle
		s.hooks.mu.Unlock()
		select {
		case <-idle:
		case <-ctx.Done():
			return fmt.Errorf("wait for webhook deliveries: %w", ctx.Err())
		}
	}
}

// Events returns every event created, oldest first.
func (s *Server) Events() []Event {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]Event, len(s.st.eventList))
	for i, ev := range s.st.eventList {
		out[i] = ev.export()
	}
	return out
}

// DeliveredEvents returns the events the endpoint acknowledged with a 2xx,
// in acknowledgement order; a duplicated event appears twice.
func (s *Server) DeliveredEvents() []Event {
	s.hooks.mu.Lock()
	defer s.hooks.mu.Unlock()
	out := make([]Event, len(s.hooks.delivered))
	for i, ev := range s.hooks.delivered {
		out[i] = ev.export()
	}
	return out
}

// Deliveries returns every delivery attempt, in the order they finished.
func (s *Server) Deliveries() []Delivery {
	s.hooks.mu.Lock()
	defer s.hooks.mu.Unlock()
	return slices.Clone(s.hooks.log)
}
