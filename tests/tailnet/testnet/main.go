// Command testnet runs a private tailnet's infrastructure on 127.0.0.1 for agentd's tests:
// Tailscale's own test control server (tailscale.com/tstest/integration/testcontrol), a DERP
// relay with STUN, and a log sink so nodes never try to upload logs. It prints one JSON line
// on stdout (the URLs and what a node needs to join) and runs until stdin closes or it gets
// SIGINT/SIGTERM, so a test harness that dies takes it down too.
//
// The DERP/STUN wiring follows tailscale.com/tstest/integration's RunDERPAndSTUN, which needs a
// testing.TB and so cannot be called from a program.
package main

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"tailscale.com/derp/derpserver"
	"tailscale.com/net/stun"
	"tailscale.com/tailcfg"
	"tailscale.com/tstest/integration/testcontrol"
	"tailscale.com/types/key"
	"tailscale.com/types/logger"
)

// Info is what the harness reads from stdout.
type Info struct {
	ControlURL     string   `json:"control_url"`
	LogURL         string   `json:"log_url"`
	DERPAddr       string   `json:"derp_addr"`
	STUNAddr       string   `json:"stun_addr"`
	AuthKey        string   `json:"auth_key"`
	MagicDNSDomain string   `json:"magicdns_domain"`
	Tags           []string `json:"tags"`
	PID            int      `json:"pid"`
}

func main() {
	var (
		host      = flag.String("host", "127.0.0.1", "address every server listens on")
		domain    = flag.String("magicdns-domain", "tailnet-test.ts.net", "MagicDNS suffix of the tailnet")
		authKey   = flag.String("auth-key", "", "pre-auth key every node must present (empty: none)")
		tags      = flag.String("tags", "tag:server", "comma-separated tags nodes may advertise")
		verbose   = flag.Bool("v", false, "log the control server's chatter to stderr")
		sameUser  = flag.Bool("same-user", false, "all nodes belong to one user")
		allOnline = flag.Bool("all-online", true, "mark every peer online in map responses")
	)
	flag.Parse()
	log.SetFlags(log.Ltime | log.Lmicroseconds)
	log.SetPrefix("testnet: ")

	logf := logger.Discard
	if *verbose {
		logf = log.Printf
	}

	derpMap, derpAddr, stunAddr, closeDERP, err := runDERPAndSTUN(*host, logf)
	if err != nil {
		log.Fatalf("DERP/STUN: %v", err)
	}
	defer closeDERP()

	logSink := httptest.NewUnstartedServer(http.HandlerFunc(sinkLogs))
	logSink.Listener = mustListen(*host)
	logSink.Start()
	defer logSink.Close()

	tagOwners := map[string][]string{}
	var tagList []string
	for _, t := range strings.Split(*tags, ",") {
		if t = strings.TrimSpace(t); t != "" {
			tagOwners[t] = nil
			tagList = append(tagList, t)
		}
	}
	control := &testcontrol.Server{
		Logf:             logf,
		DERPMap:          derpMap,
		RequireAuthKey:   *authKey,
		MagicDNSDomain:   *domain,
		DNSConfig:        &tailcfg.DNSConfig{Proxied: true},
		AllNodesSameUser: *sameUser,
		TagOwners:        tagOwners,
		AllOnline:        *allOnline,
	}
	control.HTTPTestServer = httptest.NewUnstartedServer(control)
	control.HTTPTestServer.Listener = mustListen(*host)
	control.HTTPTestServer.Start()
	defer control.HTTPTestServer.Close()

	info := Info{
		ControlURL:     control.BaseURL(),
		LogURL:         logSink.URL,
		DERPAddr:       derpAddr,
		STUNAddr:       stunAddr,
		AuthKey:        *authKey,
		MagicDNSDomain: *domain,
		Tags:           tagList,
		PID:            os.Getpid(),
	}
	if err := json.NewEncoder(os.Stdout).Encode(info); err != nil {
		log.Fatalf("writing the info line: %v", err)
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	go func() {
		// the harness holds our stdin: when it exits (or closes it), so do we
		io.Copy(io.Discard, os.Stdin)
		stop()
	}()
	<-ctx.Done()
}

func mustListen(host string) net.Listener {
	ln, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
	if err != nil {
		log.Fatalf("listen on %s: %v", host, err)
	}
	return ln
}

// sinkLogs accepts logtail uploads and drops them (nodes must never reach log.tailscale.com).
func sinkLogs(w http.ResponseWriter, r *http.Request) {
	io.Copy(io.Discard, r.Body)
	w.WriteHeader(http.StatusOK)
}

// runDERPAndSTUN starts a DERP server over TLS (self-signed; the map marks it InsecureForTests)
// and a STUN responder, both on host, and returns a one-region DERP map naming them.
func runDERPAndSTUN(host string, logf logger.Logf) (*tailcfg.DERPMap, string, string, func(), error) {
	d := derpserver.New(key.NewNode(), logf)
	handler := derpserver.AddWebSocketSupport(d, derpserver.Handler(d))
	srv := httptest.NewUnstartedServer(handler)
	srv.Listener.Close()
	srv.Listener = mustListen(host)
	srv.Config.ErrorLog = logger.StdLogger(logf)
	srv.Config.TLSNextProto = make(map[string]func(*http.Server, *tls.Conn, http.Handler))
	srv.StartTLS()

	pc, err := net.ListenPacket("udp4", net.JoinHostPort(host, "0"))
	if err != nil {
		srv.Close()
		d.Close()
		return nil, "", "", nil, err
	}
	go serveSTUN(pc.(*net.UDPConn))

	derpPort := srv.Listener.Addr().(*net.TCPAddr).Port
	stunPort := pc.LocalAddr().(*net.UDPAddr).Port
	m := &tailcfg.DERPMap{
		Regions: map[int]*tailcfg.DERPRegion{
			1: {
				RegionID:   1,
				RegionCode: "test",
				Nodes: []*tailcfg.DERPNode{{
					Name:             "t1",
					RegionID:         1,
					HostName:         host,
					IPv4:             host,
					IPv6:             "none",
					STUNPort:         stunPort,
					DERPPort:         derpPort,
					InsecureForTests: true,
					STUNTestIP:       host,
				}},
			},
		},
	}
	closeAll := func() {
		srv.CloseClientConnections()
		srv.Close()
		d.Close()
		pc.Close()
	}
	return m, srv.Listener.Addr().String(), pc.LocalAddr().String(), closeAll, nil
}

func serveSTUN(pc *net.UDPConn) {
	var buf [64 << 10]byte
	for {
		n, src, err := pc.ReadFromUDPAddrPort(buf[:])
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue
		}
		pkt := buf[:n]
		if !stun.Is(pkt) {
			continue
		}
		txid, err := stun.ParseBindingRequest(pkt)
		if err != nil {
			continue
		}
		src = netip.AddrPortFrom(src.Addr().Unmap(), src.Port())
		if _, err := pc.WriteToUDPAddrPort(stun.Response(txid, src), src); err != nil {
			fmt.Fprintf(os.Stderr, "testnet: STUN write: %v\n", err)
		}
	}
}
